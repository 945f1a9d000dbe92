"""One forward pass through a wrapped model, layer by layer, with activations recorded or patched.

The attention function registered with ``transformers.AttentionInterface`` hands every layer's
post-rotary q/k/v to the active ``Run``; MLP neurons come through a pre-hook on the MLP output
projection. A run may start at any layer and any position: positions before ``start_pos`` are
never recomputed, their keys/values come from a cached prefix (causal models cannot change them).

Shape letters: B batch, H heads, K kv-heads, T positions (T' = T - start_pos), E d_head, D d_model, M d_mlp.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any

import torch

from .errors import AtpstarError
from .families import LayerAttention
from .ops import attention_pattern, expand_kv

# q, k, v: [B, H|K, T', E]; pattern: [B, H, T', T]; z: [B, H, T', E]; neuron: [B, T', M]
SITES: tuple[str, ...] = ("q", "k", "v", "pattern", "z", "neuron")

# A patch receives (layer, site, activation, run) and returns the activation to use instead.
PatchFn = Callable[[int, str, torch.Tensor, "Run"], torch.Tensor]

ACTIVE_RUN: ContextVar[Run | None] = ContextVar("atpstar_active_run", default=None)


class Run:
    """What one forward pass records and patches.

    Args:
        n_layers: layers of the model.
        record: sites to keep, per layer, in ``records[site][layer]`` (also ``resid_pre``).
        patch: optional function that replaces activations at sites.
        start_layer: first layer computed (the input hidden state enters this layer).
        start_pos: first position computed; earlier positions come from ``prefix_kv``.
        prefix_kv: per layer, (keys [B, K, start_pos, E], values [B, K, start_pos, E]) for earlier positions.
        drop_layer: hold this layer's residual write constant in the backward graph (GradDrop reference).
    """

    def __init__(
        self,
        n_layers: int,
        record: Iterable[str] = (),
        patch: PatchFn | None = None,
        start_layer: int = 0,
        start_pos: int = 0,
        prefix_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
        drop_layer: int | None = None,
    ) -> None:
        self.record = set(record)
        self.records: dict[str, list[Any]] = {site: [None] * n_layers for site in self.record}
        self.patch = patch
        self.start_layer = start_layer
        self.start_pos = start_pos
        self.prefix_kv = prefix_kv or {}
        self.drop_layer = drop_layer
        self.scaling: dict[int, float] = {}
        self.layer_of_attention: dict[int, int] = {}
        self.attention_args: list[LayerAttention] = []

    def site(self, layer: int, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.patch is not None:
            x = self.patch(layer, name, x, self)
        if name in self.record:
            self.records[name][layer] = x
        return x

    def attention(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, args: LayerAttention
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.site(layer, "q", query)
        k = self.site(layer, "k", key)
        v = self.site(layer, "v", value)
        if self.start_pos > 0:
            prefix_k, prefix_v = self.prefix_kv[layer]
            # The prefix may be trimmed to the layer's window: keys are the last S positions up to the last query.
            k = torch.cat([prefix_k.to(k.device, k.dtype), k], dim=2)  # [B, K, S, E]
            v = torch.cat([prefix_v.to(v.device, v.dtype), v], dim=2)
        self.scaling[layer] = args.scaling
        pattern = attention_pattern(q, k, args.scaling, args.softcap, args.window)  # [B, H, T', S]
        pattern = self.site(layer, "pattern", pattern)
        z = torch.matmul(pattern, expand_kv(v, q.shape[1]))  # [B, H, T', E]
        z = self.site(layer, "z", z)
        return z.transpose(1, 2).contiguous(), pattern


def atpstar_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The function registered as attention implementation ``"atpstar"``; routes to the active run."""
    run = ACTIVE_RUN.get()
    if run is None:
        raise AtpstarError(
            "attention implementation 'atpstar' was called outside an atpstar run; "
            "call the model through atpstar (attribute/verify), or reset config._attn_implementation"
        )
    layer = run.layer_of_attention[id(module)]
    args = run.attention_args[layer]
    _check_arguments(layer, args, scaling, kwargs)
    return run.attention(layer, query, key, value, args)


def _check_arguments(layer: int, args: LayerAttention, scaling: float | None, kwargs: dict[str, Any]) -> None:
    """The model's own attention arguments must be what the family table computes; refuse any other."""
    passed: dict[str, Any] = {
        "scaling": args.scaling if scaling is None else float(scaling),
        "sliding_window": kwargs.get("sliding_window"),
        "softcap": kwargs.get("softcap"),
    }
    expected = {"scaling": args.scaling, "sliding_window": args.window, "softcap": args.softcap}
    for name, value in passed.items():
        if value != expected[name]:
            raise AtpstarError(
                f"layer {layer}: the model passes {name}={value!r} to attention but the family table computes "
                f"{expected[name]!r}; atpstar refuses to compute a different attention (please report this model)"
            )
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise AtpstarError(f"layer {layer}: attention sinks ({name}) are not implemented")
