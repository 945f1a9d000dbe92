"""One forward pass through a wrapped model, layer by layer, with activations recorded or patched.

The model hands every site of every layer it computes to the active ``Run`` (``Run.site``): the
residual stream entering the layer, the post-rotary q/k/v (through the attention function registered
with ``transformers.AttentionInterface``), the pattern and z, the attention and MLP outputs as they
join the residual stream, the stream the MLP reads, and the MLP neurons. A patch function sees them
all in that order and may replace any. A run may start at any layer and any position: positions
before ``start_pos`` are never recomputed, their keys/values come from a cached prefix (causal models
cannot change them).

Shape letters: B batch, H heads, K kv-heads, T positions (T' = T - start_pos), E d_head, D d_model, M d_mlp.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

import torch

from .errors import AtpstarError
from .families import LayerAttention
from .ops import attention_pattern, expand_kv

# Every site, in the order a layer reaches it (``Model`` documents where each comes from):
#   resid_pre [B, T', D]  residual stream entering the layer (index n_layers: the final residual stream)
#   q [B, H, T', E], k and v [B, K, T', E]  post-rotary (and post-QK-norm) projections
#   pattern [B, H, T', T]  attention probabilities; z [B, H, T', E]  pattern-weighted values
#   attn_proj [B, T', D]  attention output projection Σ_h W_O^h z_h + b_O
#   attn_out [B, T', D]   attention output as added to the residual stream (post-norm families: norm(attn_proj))
#   resid_mid [B, T', D]  residual stream after attention, before the MLP (sequential blocks only; a patch
#                         changes the stream the MLP reads and the layer's output)
#   mlp_in [B, T', D]     the residual stream as the MLP reads it, before its norm (resid_pre in parallel
#                         blocks); a patch changes what the MLP reads only
#   neuron [B, T', M]     MLP hidden activations (input of its output projection)
#   mlp_out [B, T', D]    MLP output as added to the residual stream (post-norm families: after the norm)
SITES: tuple[str, ...] = (
    "resid_pre", "q", "k", "v", "pattern", "z", "attn_proj", "attn_out", "resid_mid", "mlp_in", "neuron", "mlp_out"
)  # fmt: skip

# A patch receives (layer, site, activation, run) and returns the activation to use instead.
PatchFn = Callable[[int, str, torch.Tensor, "Run"], torch.Tensor]

# The run being computed, its model's attention modules (id -> layer) and each layer's attention
# arguments, set by ``Model.engaged``.
ACTIVE_RUN: ContextVar[tuple[Run, Mapping[int, int], Sequence[LayerAttention]] | None] = ContextVar(
    "atpstar_active_run", default=None
)


class Run:
    """What one forward pass records and patches.

    The caller builds a run (everything it needs goes into the constructor) and hands it to
    ``Model.run_layers``; during the pass the model calls ``site`` and ``attention``;
    afterwards the caller reads ``records``/``get`` and ``scaling``, and may ``release`` records it is done
    with. Nothing else writes to a run.

    Args:
        n_layers: layers of the model.
        record: sites to keep, per layer (``SITES``; ``"resid_pre"`` keeps ``n_layers + 1``: the final
            residual stream at index ``n_layers``).
        patch: optional function that replaces activations at sites (it receives every site; return
            ``x`` itself where nothing changes).
        start_layer: first layer computed (the input hidden state enters this layer).
        start_pos: first position computed; earlier positions come from ``prefix_kv``.
        prefix_kv: per layer, (keys [B, K, start_pos, E], values [B, K, start_pos, E]) for earlier positions.
    """

    def __init__(
        self,
        n_layers: int,
        record: Iterable[str] = (),
        patch: PatchFn | None = None,
        start_layer: int = 0,
        start_pos: int = 0,
        prefix_kv: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.record = frozenset(record)
        self.patch = patch
        self.start_layer = start_layer
        self.start_pos = start_pos
        self.prefix_kv: Mapping[int, tuple[torch.Tensor, torch.Tensor]] = MappingProxyType(dict(prefix_kv or {}))
        self._records: dict[str, list[Any]] = {
            site: [None] * (n_layers + 1 if site == "resid_pre" else n_layers) for site in self.record
        }
        self._scaling: dict[int, float] = {}

    @property
    def records(self) -> Mapping[str, list[Any]]:
        """Recorded activations after the pass: site -> per layer tensor (None for layers not run). Read only."""
        return MappingProxyType(self._records)

    @property
    def scaling(self) -> Mapping[int, float]:
        """Attention score scaling per layer, as the model passed it. Read only."""
        return MappingProxyType(self._scaling)

    def get(self, site: str, layer: int) -> torch.Tensor:
        """The activation recorded at ``site`` of ``layer``."""
        value = self._records[site][layer]
        if value is None:
            raise KeyError(f"site {site!r} of layer {layer} was not computed in this run")
        return value

    def release(self, site: str, layer: int) -> None:
        """Forget the record of ``site`` at ``layer`` (its memory is freed once nothing else holds it)."""
        self._records[site][layer] = None

    def close(self) -> None:
        """Forget every record and the patch function.

        A patch that is a bound method of the run's owner makes a reference cycle (owner -> run -> patch ->
        owner); until Python's cycle collector runs, that cycle would keep a whole batch's activations alive.
        """
        for per_layer in self._records.values():
            per_layer[:] = [None] * len(per_layer)
        self.patch = None

    # Called by the model during the pass ---------------------------------------------------------
    def site(self, layer: int, name: str, x: torch.Tensor) -> torch.Tensor:
        """Patch (if a patch is set) and record (if asked) the activation ``x`` at site ``name``."""
        if self.patch is not None:
            x = self.patch(layer, name, x, self)
        if name in self.record:
            self._records[name][layer] = x
        return x

    def attention(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, args: LayerAttention
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of one layer from post-rotary q [B, H, T', E], k/v [B, K, T', E]: (z [B, T', H, E], pattern)."""
        q = self.site(layer, "q", query)
        k = self.site(layer, "k", key)
        v = self.site(layer, "v", value)
        if self.start_pos > 0:
            prefix_k, prefix_v = self.prefix_kv[layer]
            # The prefix may be trimmed to the layer's window: keys are the last S positions up to the last query.
            k = torch.cat([prefix_k.to(k.device, k.dtype), k], dim=2)  # [B, K, S, E]
            v = torch.cat([prefix_v.to(v.device, v.dtype), v], dim=2)
        self._scaling[layer] = args.scaling
        pattern = attention_pattern(q, k, args.scaling, args.softcap, args.window)  # [B, H, T', S]
        pattern = self.site(layer, "pattern", pattern)
        z = torch.matmul(pattern, expand_kv(v, q.shape[1]))  # [B, H, T', E]
        z = self.site(layer, "z", z)
        return z.transpose(1, 2).contiguous(), pattern  # [B, T', H, E]


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
    active = ACTIVE_RUN.get()
    if active is None:
        raise AtpstarError(
            "attention implementation 'atpstar' was called outside an atpstar run; "
            "call the model through atpstar (attribute/verify), or reset config._attn_implementation"
        )
    run, layer_of_module, attention_args = active
    layer = layer_of_module[id(module)]
    args = attention_args[layer]
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
