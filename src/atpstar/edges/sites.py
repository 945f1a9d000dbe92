"""Edges on the model's run sites: senders' outputs, receivers' inputs, and the helpers they need.

A sender's output is read at run sites: the MLP's at ``mlp_out``, a head's from ``z`` and its output
weights. A head's sender output is W_O^h z_h, without the attention output bias: the bias is the same
on clean and noise runs, so it is part of no edge (every sender difference and every patched edge is
unchanged by where it is booked). An MLP's output includes its own bias, as MIB's ``m{l}`` does.

A receiver's input is a run site too: ``resid_pre`` for q/k/v (through ``Model.layer_qkv``, the
layer's norm, projection and rotary), ``mlp_in`` for the MLP, the final ``resid_pre`` for the logits.

Post-norm families (Gemma-2/3, OLMo-2) normalise the attention output a = Σ_h W_O^h z_h (``attn_proj``)
and the MLP output before adding them to the residual stream. The MLP's sender output is its normalised
write; a head's is its share of the normalised write, W_O^h z_h ⊙ norm(a) / a (an RMS norm is a
per-position scale times a weight, so the shares add up to the write ``attn_out`` in every run, and each
run uses its own scale).

Shape letters: B batch, H heads, K kv-heads, T positions, E d_head, D d_model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import UnsupportedModelError
from ..families import get_path
from ..model import Model
from ..runner import Run, expand_kv

# What the edges use of a model beyond the forward pass (``atpstar.model``'s backend interface).
EDGE_HELPERS = ("layer_qkv", "head_out_weights", "qkv_share", "post_norm", "parallel_residual")


def check_edges_supported(model: Model) -> None:
    """Refuse a model that cannot give edges its per-layer helpers, before any pass (``Method.attribute``)."""
    missing = [name for name in EDGE_HELPERS if not hasattr(model, name)]
    if missing:
        raise UnsupportedModelError(
            f"edges need the model members {missing}, which {type(model).__name__} lacks; node types work without them"
        )


def head_out_weights(model: Model) -> list[torch.Tensor]:
    """Per layer W_O as [H, E, D] (``Model.head_out_weights``)."""
    return model.head_out_weights()


def qkv_share(model: Model) -> float:
    """Fraction of a layer's weights in its q/k/v projections (``Model.qkv_share``)."""
    return model.qkv_share()


def layer_qkv(model: Model, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, H, T, E], k and v [B, K, T, E] of ``layer`` for residual inputs hidden [B, T, D] (``Model.layer_qkv``)."""
    return model.layer_qkv(layer, hidden)


def head_outputs(z: torch.Tensor, w_out: torch.Tensor, share: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head writes W_O^h z_h: z [B, H, T, E], w_out [H, E, D] -> [B, H, T, D] (times a post-norm
    family's ``share`` [B, T, D])."""
    out = torch.einsum("bhte,hed->bhtd", z, w_out.to(z.device, z.dtype))
    return out if share is None else out * share[:, None].to(out.device, out.dtype)


def post_norm_share(attn_proj: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """norm(a) / a elementwise [B, T, D], from a = ``attn_proj`` and norm(a) = ``attn_out`` of one layer.

    Post-norm families: a head's sender output is its W_O^h z_h times this share (per position the norm
    is a scale times a weight), so the heads' outputs add up to the normalised write in every run.
    Where a is exactly 0 the share is 0 (the write is 0 there).
    """
    safe = torch.where(attn_proj == 0, torch.ones_like(attn_proj), attn_proj)
    return torch.where(attn_proj == 0, torch.zeros_like(attn_proj), attn_out / safe)


def post_attention_norm(model: Model, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The post-norm family's norm after layer ``layer``'s attention, applied to x [..., T, D].

    Called through ``forward`` so that no run hook sees it (it is not a site of the running pass).
    """
    family = model.family
    if not model.post_norm or family.attn_post_norm is None:
        raise UnsupportedModelError(f"{model.model_id} has no post-attention norm; MIB's head convention needs one")
    norm = get_path(model.layer_modules[layer], family.attn_post_norm, family, "attn_post_norm")
    weight = next(norm.parameters(), None)
    return norm.forward(x if weight is None else x.to(weight.device))


def ungroup(n_heads: int) -> Callable[[int, str, torch.Tensor, Run], torch.Tensor]:
    """A runner patch that gives every query head its own keys and values ([B, K, ...] -> [B, H, ...]).

    The attention result is unchanged; the recorded k/v (and their gradients) become per query head,
    which is how MIB ungroups grouped-query attention.
    """

    def patch(layer: int, site: str, x: torch.Tensor, run: Run) -> torch.Tensor:
        return expand_kv(x, n_heads) if site in ("k", "v") else x

    return patch
