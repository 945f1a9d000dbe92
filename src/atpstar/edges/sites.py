"""Where edges live in a ``transformers`` model: the norms receivers read through, per-head output
weights, and the partial forward that turns a receiver's own residual input into its q, k, v.

A head's sender output is W_O^h z_h, without the attention output bias: the bias is the same on
clean and noise runs, so it is part of no edge (every sender difference and every patched edge is
unchanged by where it is booked). An MLP's output includes its own bias, as MIB's ``m{l}`` does.

Post-norm families (Gemma-2/3, OLMo-2) normalise the attention output a = Σ_h W_O^h z_h and the MLP
output before adding them to the residual stream. The MLP's sender output is its normalised write; a
head's is its share of the normalised write, W_O^h z_h ⊙ norm(a) / a (an RMS norm is a per-position
scale times a weight, so the shares add up to the write in every run, and each run uses its own scale).

Shape letters: B batch, H heads, K kv-heads, T positions, E d_head, D d_model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..families import get_path
from ..model import Model
from ..runner import Run, expand_kv


@dataclass(frozen=True)
class EdgeParts:
    """Where one family's edges attach, relative to a decoder layer (the rest -- fused q/k/v, QK-norm,
    rotary, windows -- the runner knows from the ``atpstar.families`` row; ``layer_qkv`` runs it)."""

    mlp_in: str  # module whose input is the MLP receiver's input: the MLP-input norm, or the MLP itself
    out_proj: str  # attention output projection (W_O per head)
    attn_write: str | None = None  # norm between the attention output and the residual stream (post-norm)
    mlp_write: str | None = None  # norm between the MLP output and the residual stream (post-norm)


_PRE_NORM = EdgeParts("post_attention_layernorm", "self_attn.o_proj")
_GEMMA = EdgeParts(
    "pre_feedforward_layernorm", "self_attn.o_proj", "post_attention_layernorm", "post_feedforward_layernorm"
)
EDGE_PARTS: dict[str, EdgeParts] = {
    "gpt2": EdgeParts("ln_2", "attn.c_proj"),
    "gpt_neox": EdgeParts("post_attention_layernorm", "attention.dense"),
    "llama": _PRE_NORM,  # also Mistral, Qwen2
    "qwen3": _PRE_NORM,  # per-head QK-norm
    "phi3": _PRE_NORM,  # fused qkv_proj
    "gemma2": _GEMMA,  # pre- and post-norms, soft-cap, sliding layers
    "gemma3": _GEMMA,  # + per-head QK-norm, local/global rotary
    "olmo2": EdgeParts("mlp", "self_attn.o_proj", "post_attention_layernorm", "post_feedforward_layernorm"),
}


def check_edges_supported(model: Model) -> None:
    """Refuse a model whose family has no edge graph, before any pass (``Method.attribute``)."""
    edge_parts(model)


def edge_parts(model: Model) -> EdgeParts:
    name = model.family.name
    if name not in EDGE_PARTS:
        raise UnsupportedModelError(
            f"edges are not implemented for family {name!r}; families with edges: {sorted(EDGE_PARTS)}. "
            "Node types work for every family"
        )
    return EDGE_PARTS[name]


def _module(model: Model, layer: int, path: str) -> Any:
    return get_path(model._layers[layer], path)


def head_out_weights(model: Model) -> list[torch.Tensor]:
    """Per layer W_O as [H, E, D], read off the projection module (works for Linear and GPT-2's Conv1D)."""
    sizes = model.sizes
    width = sizes.n_heads * sizes.d_head
    out = []
    with torch.no_grad():
        for layer in range(model.n_layers):
            proj = _module(model, layer, edge_parts(model).out_proj)
            eye = torch.eye(width, dtype=model.dtype, device=model.device)
            weight = proj(eye) - proj(torch.zeros_like(eye[:1]))  # [H*E, D]
            out.append(weight.view(sizes.n_heads, sizes.d_head, -1))  # [H, E, D]
    return out


def head_outputs(z: torch.Tensor, w_out: torch.Tensor, share: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head writes W_O^h z_h: z [B, H, T, E], w_out [H, E, D] -> [B, H, T, D] (times a post-norm
    family's ``share`` [B, T, D])."""
    out = torch.einsum("bhte,hed->bhtd", z, w_out.to(z.device, z.dtype))
    return out if share is None else out * share[:, None].to(out.device, out.dtype)


def qkv_share(model: Model) -> float:
    """Fraction of a layer's weights in its q/k/v projections (the cost unit of a receiver copy)."""
    decoder = model._layers[0]
    attention = get_path(decoder, model.family.attention)
    out_proj = _module(model, 0, edge_parts(model).out_proj)
    total = sum(p.numel() for p in decoder.parameters())
    qkv = sum(p.numel() for p in attention.parameters()) - sum(p.numel() for p in out_proj.parameters())
    return qkv / max(total, 1)


class _Stop(Exception):
    """Ends a partial forward once the layer's q, k, v are known."""


def layer_qkv(model: Model, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, H, T, E], k and v [B, K, T, E] (post-rotary) of ``layer`` for residual inputs hidden [B, T, D].

    Runs the layer's own norm, projections and rotary, and stops before the attention itself.
    """
    found: dict[str, torch.Tensor] = {}

    def stop(at_layer: int, site: str, x: torch.Tensor, run: Run) -> torch.Tensor:
        if at_layer == layer and site in ("q", "k", "v"):
            found[site] = x
            if site == "v":
                raise _Stop
        return x

    try:
        model.run_layers(hidden, Run(model.n_layers, patch=stop, start_layer=layer))
    except _Stop:
        pass
    return found["q"], found["k"], found["v"]


def ungroup(n_heads: int) -> Callable[[int, str, torch.Tensor, Run], torch.Tensor]:
    """A runner patch that gives every query head its own keys and values ([B, K, ...] -> [B, H, ...]).

    The attention result is unchanged; the recorded k/v (and their gradients) become per query head,
    which is how MIB ungroups grouped-query attention.
    """

    def patch(layer: int, site: str, x: torch.Tensor, run: Run) -> torch.Tensor:
        return expand_kv(x, n_heads) if site in ("k", "v") else x

    return patch


# A hook on the MLP-input norm: (layer, its input [B, T, D]) -> the input to use.
MlpInFn = Callable[[int, torch.Tensor], torch.Tensor]
# A hook on the MLP's residual write: (layer, the write [B, T, D]) -> None (observe only).
MlpOutFn = Callable[[int, torch.Tensor], None]
# A hook on the attention post-norm: (layer, share [B, T, D]) -> None, share = norm(a) / a elementwise.
ShareFn = Callable[[int, torch.Tensor], None]


@contextmanager
def mlp_hooks(
    model: Model, on_input: MlpInFn | None = None, on_output: MlpOutFn | None = None, on_share: ShareFn | None = None
) -> Iterator[None]:
    """Route each layer's MLP input (before its norm) and MLP write (after its post-norm, if any) through
    callbacks, and report post-norm shares of the attention output; removed afterwards."""
    handles = []
    found = edge_parts(model)
    try:
        for layer in range(model.n_layers):
            if on_input is not None:
                norm = _module(model, layer, found.mlp_in)
                handles.append(norm.register_forward_pre_hook(partial(_input_hook, layer, on_input)))
            if on_output is not None:
                write = _module(model, layer, found.mlp_write) if found.mlp_write else model._mlp_out_modules[layer]
                handles.append(write.register_forward_hook(partial(_output_hook, layer, on_output)))
            if on_share is not None and found.attn_write:
                norm = _module(model, layer, found.attn_write)
                handles.append(norm.register_forward_hook(partial(_share_hook, layer, on_share)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _share_hook(layer: int, fn: ShareFn, module: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:
    """Post-norm families: a head's sender output is its W_O^h z_h times norm(a) / a (a the attention
    output, elementwise; per position the norm is a scale times a weight), so the heads' outputs add up
    to the normalised write in every run. Where a is exactly 0 the share is 0 (the write is 0 there)."""
    written = args[0]
    safe = torch.where(written == 0, torch.ones_like(written), written)
    fn(layer, torch.where(written == 0, torch.zeros_like(written), out / safe))


def _input_hook(layer: int, fn: MlpInFn, module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (fn(layer, args[0]),) + tuple(args[1:])


def _output_hook(layer: int, fn: MlpOutFn, module: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:
    fn(layer, out)
