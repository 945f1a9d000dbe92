"""Products with sparse latent differences: Δf is zero wherever a latent is off on both prompts.

Trained SAEs and transcoders keep few latents on per token (TopK's k, JumpReLU's L0 of ~10-100 of 16k), so
Δf [.., S] has few nonzeros, and the two products latent AtP needs with the decoder, Δf W_dec (the change of
the write, for Δerror) and Δf ⊙ (g W_decᵀ) (the pullback of a gradient g), cost nnz · D instead of
(.. · S) · D when they visit only the nonzeros. Dense inputs (random test dictionaries with half the
latents on) keep the dense product: the sparse one wins only below ``DENSE_SHARE``.

Shape letters: S latents, D width, N nonzeros of Δf.
"""

from __future__ import annotations

import torch

DENSE_SHARE = 0.125  # above this share of nonzeros, a dense matmul is faster than gathering rows


def _sparse(delta: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """The nonzeros of delta [.., S] as index tensors, or None when a dense product is cheaper."""
    if delta.numel() == 0:
        return None
    nonzero = torch.count_nonzero(delta)
    if int(nonzero) > DENSE_SHARE * delta.numel():
        return None
    return torch.nonzero(delta, as_tuple=True)


def delta_times_rows(delta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """delta [.., S] @ rows [S, D] -> [.., D], visiting only the nonzeros of delta when they are few."""
    flat = delta.reshape(-1, delta.shape[-1])  # [M, S]
    found = _sparse(flat)
    if found is None:
        return delta @ rows
    row, latent = found
    out = torch.zeros(flat.shape[0], rows.shape[-1], dtype=torch.result_type(delta, rows), device=delta.device)
    out.index_add_(0, row, flat[row, latent, None] * rows[latent])  # [N, D] summed into their rows
    return out.view(*delta.shape[:-1], rows.shape[-1])  # [.., D]


def delta_times_pullback(delta: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """delta [.., S] ⊙ (grad [.., D] @ rows [S, D]ᵀ) -> [.., S], computed only where delta is nonzero when sparse."""
    found = _sparse(delta)
    if found is None:
        return delta * (grad @ rows.T)
    *lead, latent = found
    values = (grad[tuple(lead)] * rows[latent]).sum(-1)  # [N]
    out = torch.zeros_like(delta, dtype=torch.result_type(delta, grad))
    out[found] = delta[found] * values
    return out
