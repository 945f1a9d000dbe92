"""Products with sparse latent differences: Δf is zero wherever a latent is off on both prompts.

Trained SAEs and transcoders keep few latents on per token (TopK's k, JumpReLU's L0 of ~10-100 of 16k), so
Δf [.., S] has few nonzeros, and the two products latent AtP needs with the decoder, Δf W_dec (the change of
the write, for Δerror) and Δf ⊙ (g W_decᵀ) (the pullback of a gradient g), cost nnz · D instead of
(.. · S) · D when they visit only the nonzeros: a CSR matrix product and a sampled dense product (SDDMM,
``torch.sparse.sampled_addmm``), neither of which forms an [nnz, D] gather. Dense inputs (random test
dictionaries with half the latents on) keep the dense product: the sparse one wins only below ``DENSE_SHARE``.
``compressed`` finds the nonzeros once; a gradient step passes the result to every pullback of its passes.

Shape letters: S latents, D width, M flattened leading positions.
"""

from __future__ import annotations

import warnings

import torch

DENSE_SHARE = 0.03  # above this share of nonzeros, a dense matmul is faster than the sparse kernels

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def compressed(delta: torch.Tensor) -> torch.Tensor | None:
    """The nonzeros of delta [.., S] as a CSR matrix [M, S], or None when a dense product is cheaper."""
    flat = delta.reshape(-1, delta.shape[-1])  # [M, S]
    if flat.numel() == 0 or flat.layout != torch.strided:
        return None
    if int(torch.count_nonzero(flat)) > DENSE_SHARE * flat.numel():
        return None
    return flat.to_sparse_csr()


def delta_times_rows(delta: torch.Tensor, rows: torch.Tensor, csr: torch.Tensor | None = None) -> torch.Tensor:
    """delta [.., S] @ rows [S, D] -> [.., D], visiting only the nonzeros of delta when they are few.

    ``csr``: ``compressed(delta)`` when the caller already has it.
    """
    csr = compressed(delta) if csr is None else csr
    if csr is None:
        return delta @ rows
    out = csr @ rows.to(csr.dtype)  # [M, D]
    return out.view(*delta.shape[:-1], rows.shape[-1])  # [.., D]


def delta_times_pullback(
    delta: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor, csr: torch.Tensor | None = None
) -> torch.Tensor:
    """delta [.., S] ⊙ (grad [.., D] @ rows [S, D]ᵀ) -> [.., S], computed only where delta is nonzero when sparse.

    ``csr``: ``compressed(delta)`` when the caller already has it.
    """
    csr = compressed(delta) if csr is None else csr
    if csr is None:
        return delta * (grad @ rows.T)
    dtype = torch.result_type(delta, grad)
    flat_grad = grad.reshape(-1, grad.shape[-1]).to(dtype)  # [M, D]
    sampled = torch.sparse.sampled_addmm(csr.to(dtype), flat_grad, rows.to(dtype).T, beta=0.0)  # [M, S] CSR
    values = sampled.values() * csr.values().to(dtype)  # [nnz]
    out = torch.sparse_csr_tensor(
        csr.crow_indices(), csr.col_indices(), values, csr.shape, check_invariants=False
    ).to_dense()  # [M, S]
    return out.view(delta.shape)  # [.., S]
