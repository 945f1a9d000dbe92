"""Where edges live in a ``transformers`` model: the norms receivers read through, per-head output
weights, and the partial forward that turns a receiver's own residual input into its q, k, v.

A head's sender output is W_O^h z_h, without the attention output bias: the bias is the same on
clean and noise runs, so it is part of no edge (every sender difference and every patched edge is
unchanged by where it is booked). An MLP's output includes its own bias, as MIB's ``m{l}`` does.

Shape letters: B batch, H heads, K kv-heads, T positions, E d_head, D d_model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..families import get_path
from ..model import Model
from ..runner import Run, expand_kv

# Per family row of ``atpstar.families`` (relative to a decoder layer): the norm before attention,
# the norm before the MLP, and the attention output projection. Everything else (fused q/k/v, QK-norm,
# rotary, windows) the runner already knows from the family row: ``layer_qkv`` runs it.
EDGE_PARTS: dict[str, tuple[str, str, str]] = {
    "gpt2": ("ln_1", "ln_2", "attn.c_proj"),
    "gpt_neox": ("input_layernorm", "post_attention_layernorm", "attention.dense"),
    "llama": ("input_layernorm", "post_attention_layernorm", "self_attn.o_proj"),  # also Mistral, Qwen2
    "qwen3": ("input_layernorm", "post_attention_layernorm", "self_attn.o_proj"),  # per-head QK-norm
    "phi3": ("input_layernorm", "post_attention_layernorm", "self_attn.o_proj"),  # fused qkv_proj
}

# Families whose residual writes pass through a norm after attention / MLP: a head's write is then
# not its own W_O^h z_h, so the edge graph's senders are not defined for them (yet).
NORMED_WRITES = {
    "gemma2": "Gemma-2 normalises each attention and MLP output before adding it to the residual stream",
    "gemma3": "Gemma-3 normalises each attention and MLP output before adding it to the residual stream",
    "olmo2": "OLMo-2 normalises each attention and MLP output before adding it to the residual stream",
}


def check_edges_supported(model: Model) -> None:
    """Refuse a model whose family has no edge graph, before any pass (``Method.attribute``)."""
    parts(model, 0)


def parts(model: Model, layer: int) -> tuple[Any, Any, Any]:
    """(attention-input norm, MLP-input norm, attention output projection) of one layer."""
    name = model.family.name
    if name not in EDGE_PARTS:
        why = (
            f" ({NORMED_WRITES[name]}: per-head senders W_O^h z_h do not add up to the write)"
            if name in NORMED_WRITES
            else ""
        )
        raise UnsupportedModelError(
            f"edges are not implemented for family {name!r}{why}; families with edges: {sorted(EDGE_PARTS)} "
            "(GPT-2, GPT-NeoX/Pythia, Llama/Mistral/Qwen2, Qwen3, Phi-3). Node types work for every family"
        )
    decoder = model._layers[layer]
    return tuple(get_path(decoder, path) for path in EDGE_PARTS[model.family.name])  # type: ignore[return-value]


def head_out_weights(model: Model) -> list[torch.Tensor]:
    """Per layer W_O as [H, E, D], read off the projection module (works for Linear and GPT-2's Conv1D)."""
    sizes = model.sizes
    width = sizes.n_heads * sizes.d_head
    out = []
    with torch.no_grad():
        for layer in range(model.n_layers):
            proj = parts(model, layer)[2]
            eye = torch.eye(width, dtype=model.dtype, device=model.device)
            weight = proj(eye) - proj(torch.zeros_like(eye[:1]))  # [H*E, D]
            out.append(weight.view(sizes.n_heads, sizes.d_head, -1))  # [H, E, D]
    return out


def head_outputs(z: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """Per-head writes W_O^h z_h: z [B, H, T, E], w_out [H, E, D] -> [B, H, T, D]."""
    return torch.einsum("bhte,hed->bhtd", z, w_out.to(z.device, z.dtype))


def qkv_share(model: Model) -> float:
    """Fraction of a layer's weights in its q/k/v projections (the cost unit of a receiver copy)."""
    decoder = model._layers[0]
    attention = get_path(decoder, model.family.attention)
    out_proj = parts(model, 0)[2]
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
# A hook on the MLP output projection: (layer, its output [B, T, D]) -> None (observe only).
MlpOutFn = Callable[[int, torch.Tensor], None]


@contextmanager
def mlp_hooks(model: Model, on_input: MlpInFn | None = None, on_output: MlpOutFn | None = None) -> Iterator[None]:
    """Route each layer's MLP input (before its norm) and MLP output through callbacks; removed afterwards."""
    handles = []
    try:
        for layer in range(model.n_layers):
            if on_input is not None:
                norm = parts(model, layer)[1]
                handles.append(norm.register_forward_pre_hook(partial(_input_hook, layer, on_input)))
            if on_output is not None:
                handles.append(
                    model._mlp_out_modules[layer].register_forward_hook(partial(_output_hook, layer, on_output))
                )
        yield
    finally:
        for handle in handles:
            handle.remove()


def _input_hook(layer: int, fn: MlpInFn, module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (fn(layer, args[0]),) + tuple(args[1:])


def _output_hook(layer: int, fn: MlpOutFn, module: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:
    fn(layer, out)
