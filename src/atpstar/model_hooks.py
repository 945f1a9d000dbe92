"""The module sites of a ``transformers`` decoder layer: hooks that hand block outputs and inputs to a ``Run``.

q/k/v, pattern and z reach the run through the attention function (``runner.atpstar_attention``); the
residual stream entering each layer through ``Model.run_layers``. The rest are module outputs and
inputs, found through the family row:

- ``attn_proj``: the attention module's output (Σ_h W_O^h z_h + b_O); ``attn_out``: the same, or its
  post-norm's output in post-norm families (what joins the residual stream).
- ``resid_mid``: the MLP-input module's input in a sequential block, the residual stream after
  attention. A layer saves that stream before its MLP runs, so a patch's change comes back to
  ``run_layers`` through ``shifts`` and is added to the layer output there.
- ``mlp_in``: the same input as the MLP reads it (in parallel blocks: the layer's input); a patch
  changes what the MLP reads and nothing else.
- ``neuron``: the input of the MLP's down projection; ``mlp_out``: the MLP's output, or its post-norm's.

Hooks are registered only for runs that patch or record one of these sites, and they act only for the
run that is active (a partial forward started inside a patch does not reach the outer run's hooks).

Shape letters: B batch, T' positions computed, D d_model, M d_mlp.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from .families import Family, get_path
from .runner import ACTIVE_RUN, Run

# Sites these hooks serve (the others come from the attention function and the layer loop).
MODULE_SITES = frozenset({"attn_proj", "attn_out", "resid_mid", "mlp_in", "neuron", "mlp_out"})


@dataclass(frozen=True)
class LayerParts:
    """The modules of one decoder layer that carry sites (resolved once, from the family row)."""

    attention: torch.nn.Module  # its output is attn_proj
    out_proj: torch.nn.Module  # attention output projection: W_O of every head
    attn_post_norm: torch.nn.Module | None  # its output is attn_out (post-norm families)
    mlp_in: torch.nn.Module  # its input is resid_mid / mlp_in
    down_proj: torch.nn.Module  # its input is neuron
    mlp_write: torch.nn.Module  # its output is mlp_out: the MLP, or the norm after it
    sequential: bool  # the MLP reads the stream after attention (a resid_mid site exists)


def layer_parts(family: Family, layer: torch.nn.Module, parallel: bool) -> LayerParts:
    """Resolve a layer's site modules; a missing one names the family and the field at fault."""

    def part(field: str) -> Any:
        return get_path(layer, getattr(family, field), family, field)

    attn_post_norm = part("attn_post_norm") if family.attn_post_norm else None
    return LayerParts(
        attention=part("attention"),
        out_proj=part("out_proj"),
        attn_post_norm=attn_post_norm,
        mlp_in=part("mlp_in"),
        down_proj=part("down_proj"),
        mlp_write=part("mlp_post_norm") if family.mlp_post_norm else part("mlp"),
        sequential=not parallel,
    )


def site_hooks(parts: list[LayerParts], run: Run, shifts: dict[int, torch.Tensor]) -> list[Any]:
    """Register the module-site hooks of every layer for ``run``; returns the handles to remove."""
    if run.patch is None and not run.record & MODULE_SITES:
        return []
    handles = []
    for layer, p in enumerate(parts):
        handles.append(p.attention.register_forward_hook(partial(_attention_out, layer, run, p.attn_post_norm is None)))
        if p.attn_post_norm is not None:
            handles.append(p.attn_post_norm.register_forward_hook(partial(_post_norm_out, layer, run)))
        handles.append(p.mlp_in.register_forward_pre_hook(partial(_mlp_input, layer, run, p.sequential, shifts)))
        handles.append(p.down_proj.register_forward_pre_hook(partial(_neuron_input, layer, run)))
        handles.append(p.mlp_write.register_forward_hook(partial(_mlp_out, layer, run)))
    return handles


def _active(run: Run) -> bool:
    active = ACTIVE_RUN.get()
    return active is not None and active[0] is run


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _with_first(out: Any, x: torch.Tensor) -> Any:
    return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x


def _attention_out(layer: int, run: Run, pre_norm: bool, module: torch.nn.Module, args: Any, out: Any) -> Any:
    if not _active(run):
        return None
    x = run.site(layer, "attn_proj", _first(out))  # [B, T', D]
    if pre_norm:  # nothing between the projection and the residual stream
        x = run.site(layer, "attn_out", x)
    return _with_first(out, x)


def _post_norm_out(layer: int, run: Run, module: torch.nn.Module, args: Any, out: Any) -> Any:
    if not _active(run):
        return None
    return _with_first(out, run.site(layer, "attn_out", _first(out)))  # [B, T', D]


def _mlp_input(
    layer: int, run: Run, sequential: bool, shifts: dict[int, torch.Tensor], module: torch.nn.Module, args: Any
) -> Any:
    if not _active(run):
        return None
    x = args[0]  # [B, T', D]
    if sequential:
        stream = run.site(layer, "resid_mid", x)
        if stream is not x:  # the layer adds its MLP write to x, saved before this hook: run_layers adds the change
            shifts[layer] = stream - x
        x = stream
    return (run.site(layer, "mlp_in", x),) + tuple(args[1:])


def _neuron_input(layer: int, run: Run, module: torch.nn.Module, args: Any) -> Any:
    if not _active(run):
        return None
    return (run.site(layer, "neuron", args[0]),) + tuple(args[1:])  # [B, T', M]


def _mlp_out(layer: int, run: Run, module: torch.nn.Module, args: Any, out: Any) -> Any:
    if not _active(run):
        return None
    return _with_first(out, run.site(layer, "mlp_out", _first(out)))  # [B, T', D]
