"""Encoding many tokens with a wide, sparse dictionary: a bfloat16 screen, then exact values where a latent may fire.

The encoder product x W_enc [M, S] costs as much as the model itself when 16k-wide dictionaries sit on every
layer (Gemma-3-270M: 17 × 10.5M multiply-adds per token, against ~100M for the model), yet only the few
latents that fire are kept. ``encode_many`` computes the product in bfloat16 (about 3x faster on CPUs with
AVX512-BF16 or AMX; not on GPUs, whose bfloat16 reductions the bound does not cover), bounds its error, and
recomputes exactly, in the input's dtype, only the latents whose bound does not rule them out (a sampled
product, ``torch.sparse.sampled_addmm``). The result equals ``Dictionary.encode`` up to the order of the sums
in each exact dot product.

The bound: with u = 2^-8 (bfloat16's unit roundoff) and fp32 accumulation over D terms (γ_D = D·2^-24 / (1 - D·2^-24)),

    |p̃ - x·w| <= (2u + u² + γ_D (1 + u)²) Σ_j |x_j w_j| + u |p̃| / (1 - u) <= c ‖x‖ ‖w‖ + u' |p̃|

(Cauchy-Schwarz), used with a safety factor of 1.5. A latent is a candidate when its upper bound passes the
activation's cut (ReLU: 0; JumpReLU: its threshold; TopK: the k-th largest lower bound of its token).
When more than ``MAX_SHARE`` of the entries are candidates (dense dictionaries) the dense exact product runs.

Shape letters: M tokens, D d_in, S d_sae, N candidates.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

from .dictionary import Dictionary

MIN_LATENTS = 4096  # narrower dictionaries encode densely (the screen's overhead is not worth it)
MAX_SHARE = 0.05  # above this share of candidates, the dense exact product runs
_U = 2.0**-8  # bfloat16 unit roundoff
_SAFETY = 1.5


@functools.cache
def _cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); otherwise the screen is slower."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def screens(dictionary: Dictionary, x: torch.Tensor) -> bool:
    """Whether ``encode_many`` screens inputs x [.., D] of this dictionary (else it encodes densely)."""
    if dictionary.d_sae < MIN_LATENTS or x.dtype not in (torch.float32, torch.float64):
        return False
    # CPU only: cuBLAS may reduce bfloat16 products in reduced precision (allow_bf16_reduced_precision_reduction),
    # which the bound does not cover.
    return x.device.type == "cpu" and _cpu_has_bf16()


def encode_many(dictionary: Dictionary, x: torch.Tensor) -> torch.Tensor:
    """Latent activations f [.., S] of inputs x [.., D], as ``Dictionary.encode`` (screened when it pays)."""
    if not screens(dictionary, x):
        return dictionary.encode(x)
    normed, _, _ = dictionary.normalise(x)
    if dictionary.apply_b_dec_to_input:
        normed = normed - dictionary.b_dec.to(x.device, x.dtype)
    flat = normed.reshape(-1, dictionary.d_in)  # [M, D]
    f = _screened(dictionary, flat)
    if f is None:
        return dictionary.encode(x)
    return f.view(*x.shape[:-1], dictionary.d_sae)  # [.., S]


def _weights(dictionary: Dictionary, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """The screen's weights on ``like``'s device, kept on the dictionary: W_enc in bfloat16 and its columns' norms.

    W_enc itself is re-laid out column-major once (same values): the sampled product reads its columns.
    """
    key = f"screen:{like.device}"
    if key not in dictionary.cache:
        if dictionary.W_enc.stride(0) != 1:
            dictionary.W_enc = dictionary.W_enc.T.contiguous().T  # [D, S] with columns contiguous
        w_enc = dictionary.W_enc.to(like.device)
        dictionary.cache[key] = {
            "bf16": w_enc.to(torch.bfloat16).contiguous(),  # [D, S] row-major (the fast kernel)
            "norms": w_enc.double().norm(dim=0),  # [S]
        }
    return dictionary.cache[key]


def _screened(dictionary: Dictionary, flat: torch.Tensor) -> torch.Tensor | None:
    """f [M, S] from inputs flat [M, D] (already normalised), or None when too many latents are candidates."""
    cached = _weights(dictionary, flat)
    dtype, n_in = flat.dtype, dictionary.d_in
    norms = flat.double().norm(dim=-1)  # [M]
    if not bool(torch.isfinite(norms).all()) or float(norms.max()) * float(cached["norms"].max()) > 1e30:
        return None  # bfloat16 sums could overflow: the bound would not hold
    approx = flat.to(torch.bfloat16) @ cached["bf16"]  # [M, S] bfloat16
    gamma = n_in * 2.0**-24 / (1 - n_in * 2.0**-24)
    spread = (norms * _SAFETY * (2 * _U + _U**2 + gamma * (1 + _U) ** 2)).to(dtype)  # [M]
    relative = _SAFETY * _U / (1 - _U)  # of |p̃|: the rounding of the product to bfloat16
    b_enc = dictionary.b_enc.to(flat.device, dtype)
    candidate = _candidates(dictionary, approx, spread, cached["norms"].to(dtype), b_enc, relative)
    rows, cols = torch.nonzero(candidate, as_tuple=True)  # [N] each
    if len(rows) > MAX_SHARE * candidate.numel():
        return None
    crow = torch.searchsorted(rows, torch.arange(len(flat) + 1, device=rows.device))  # [M + 1] (rows sorted)
    pattern = torch.sparse_csr_tensor(crow, cols, torch.ones(len(rows), dtype=dtype), candidate.shape,
                                      check_invariants=False)  # fmt: skip
    w_enc = dictionary.W_enc.to(flat.device, dtype)  # [D, S] columns contiguous (``_weights``)
    pre = torch.sparse.sampled_addmm(pattern, flat, w_enc, beta=0.0).values() + b_enc[cols]  # [N]
    return _activate(dictionary, pre, rows, cols, candidate.shape)


def _candidates(dictionary: Dictionary, approx: torch.Tensor, spread: torch.Tensor, norms: torch.Tensor,
                b_enc: torch.Tensor, relative: float) -> torch.Tensor:  # fmt: skip
    """bool [M, S]: the latents whose activation the bounds do not rule out being nonzero.

    With the bound |pre - p̃ - b| <= r|p̃| + spread_m · norms_s, pre > c implies p̃ + r|p̃| > c - b - spread · norms
    =: q, which implies p̃ > q - r'|q| with r' = r / (1 - r) (both signs of q): one comparison per entry.
    """
    if dictionary.activation == "topk":
        lower = approx - relative * approx.abs() - torch.outer(spread, norms) + b_enc  # [M, S]
        kth = torch.topk(lower, int(dictionary.k or 1), dim=-1).values[:, -1:]  # [M, 1]
        cut = torch.maximum(kth, torch.zeros_like(kth)) - b_enc  # [M, S]
    else:
        cut = -b_enc
        if dictionary.activation == "jumprelu" and dictionary.threshold is not None:
            cut = torch.clamp(dictionary.threshold.to(b_enc), min=0) - b_enc  # [S]
        cut = cut.expand(len(spread), -1)  # [S] -> [M, S]
    q = torch.addr(cut, spread, norms, alpha=-1)  # [M, S]
    q = q.sub_(q.abs(), alpha=relative / (1 - relative))
    return approx > q


def _activate(dictionary: Dictionary, pre: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
              shape: torch.Size) -> torch.Tensor:  # fmt: skip
    """f [M, S] from the exact pre-activations pre [N] of the candidates (rows, cols); 0 elsewhere."""
    if dictionary.activation == "topk":
        dense = torch.full(shape, float("-inf"), dtype=pre.dtype, device=pre.device)
        dense[rows, cols] = pre
        top = torch.topk(dense, int(dictionary.k or 1), dim=-1)
        return torch.zeros_like(dense).scatter(-1, top.indices, torch.relu(top.values))
    if dictionary.activation == "jumprelu" and dictionary.threshold is not None:
        value = torch.relu(pre) * (pre > dictionary.threshold.to(pre.device, pre.dtype)[cols])
    else:
        value = torch.relu(pre)
    out = torch.zeros(shape, dtype=pre.dtype, device=pre.device)
    out[rows, cols] = value
    return out
