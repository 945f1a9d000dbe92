"""The QK fix on dictionary latents: the softmax of the attention downstream of a latent, recomputed exactly.

AtP* (Kramár et al. 2024 §4) replaces the linear estimate of a query or key node's effect through the
attention pattern by the exact change of the pattern. A latent (or error node) at position t writes
δ = Δf_i · scale · W_dec[i] (Δerror_t) into the stream that attention layer m reads: m = l for a write at
resid_pre of layer l (``hook_resid_post`` of l - 1), m = l + 1 for attn_out, resid_mid and mlp_out of layer l
(no fix for mlp_in, or past the last layer). With x the base residual stream entering layer m,

    Î_fix = Î_AtP - δ · J_qkᵀ(∂L/∂q, ∂L/∂k)(x)_t + Σ_{h, rows} (A'(q', k') - A) · ∂L/∂A

where J_qkᵀ(...) is the gradient reaching x through layer m's queries and keys only (one vector-Jacobian
product per step), and q'_t, k'_t are the layer's query and key at position t computed exactly from x_t + δ
(its norm, projections and rotary; ``Model.run_layers`` stopped after the keys). Only query row t and key
column t change, so A' differs from A in rows >= t. Latents with Δf = 0 write nothing and are not recomputed.
Paths other than layer m's queries and keys stay linear, as in the node QK fix. Under GradDrop each backward
pass brings its own gradients; a pass that skips layer m has no path through its attention (no fix).

Cost: one q/k projection of one position per changed latent and error node (counted as 1 / (T · L) of a forward
times the layer's q/k/v weight share), plus one projection of the step's pairs and, per backward pass, its
vector-Jacobian product; recorded in ``info["latent_qk_fix_cost"]``.

Shape letters: b pairs in the step, n changed nodes, H heads, K kv-heads, T positions, E d_head, D d_model, S d_sae.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..cost import Cost
from ..ops import attention_pattern, upcast
from ..runner import Run
from .dictionary import Dictionary
from .patching import Differences
from .sites import Site, run_site

FIX_SITES = ("q", "k", "pattern")  # the gradients the fix reads at layer m
_FEEDS_NEXT = ("attn_out", "resid_mid", "mlp_out")


class _Stop(Exception):
    """Ends a partial forward once the layer's queries and keys are known."""


def downstream_attention(write: Site, n_layers: int) -> int | None:
    """The attention layer that reads a write at ``write`` directly (None: no attention reads it)."""
    layer = write.layer if write.site == "resid_pre" else write.layer + 1 if write.site in _FEEDS_NEXT else None
    return layer if layer is not None and layer < n_layers else None


def layer_qk(model: Any, layer: int, hidden: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, T', E] and k [B, K, T', E] of ``layer`` for residual inputs hidden [B, T', D] at ``start_pos``.."""
    found: dict[str, torch.Tensor] = {}

    def stop(at_layer: int, site: str, x: torch.Tensor, run: Run) -> torch.Tensor:
        if at_layer == layer and site in ("q", "k"):
            found[site] = x
            if site == "k":
                raise _Stop
        return x

    try:
        model.run_layers(hidden, Run(model.n_layers, patch=stop, start_layer=layer, start_pos=start_pos))
    except _Stop:
        pass
    return found["q"], found["k"]


@dataclass
class _Changed:
    """One dictionary's changed nodes (Δ != 0) and their exact queries and keys at layer m."""

    layer: int
    pair: torch.Tensor  # [n]
    latent: torch.Tensor  # [n] (-1: the error node)
    pos: torch.Tensor  # [n]
    delta: torch.Tensor  # [n, D] what the node writes
    q: torch.Tensor  # [n, H, E] query at its position with δ added
    k: torch.Tensor  # [n, K, E] key at its position with δ added


class LatentQKFix:
    """The QK fix for one gradient step: built after the forward, asked once per dictionary and backward pass."""

    def __init__(
        self, model: Any, step: Any, dictionaries: Sequence[Dictionary], diffs: Mapping[str, Differences]
    ) -> None:
        self.model, self.cost = model, Cost()  # what the fix adds to the step's passes
        self.n_layers, self.share = model.n_layers, model.qkv_share()
        self.layers = {
            d.name: m for d in dictionaries
            if (m := downstream_attention(run_site(d.write_hook), self.n_layers)) is not None
        }  # fmt: skip
        self.base = {m: self._projection(step, m) for m in set(self.layers.values())}
        self.pattern = {m: upcast(step.base.get("pattern", m).detach()) for m in self.base}  # [b, H, T, T]
        self.changed = {d.name: self._changed(d, diffs[d.name], self.layers[d.name]) for d in dictionaries
                        if d.name in self.layers}  # fmt: skip
        # A' - A per changed node depends on the base run only; GradDrop's passes reuse it (key: node set, t).
        self._pattern_changes: dict[tuple[int, int], torch.Tensor] = {}

    def _projection(self, step: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x [b, T, D] requiring grad, q, k): the base stream entering ``layer`` and its queries and keys, with graph."""
        with torch.enable_grad():
            x = step.base.get("resid_pre", layer).detach().requires_grad_(True)
            q, k = layer_qk(self.model, layer, x, 0)
        self.cost.add_forward(x.shape[0] * self.share / self.n_layers)
        return x, q, k

    def _changed(self, dictionary: Dictionary, diff: Differences, layer: int) -> _Changed:
        x = self.base[layer][0].detach()  # [b, T, D]
        pair, pos, latent = torch.nonzero(diff.latents != 0, as_tuple=True)  # latents [b, T, S]
        amount = (diff.latents[pair, pos, latent] * diff.scale[pair, pos, 0])[:, None]  # [n, 1]
        deltas = amount * dictionary.W_dec[latent].to(amount.device, amount.dtype)  # [n, D]
        err_pair, err_pos = torch.nonzero(diff.error.abs().sum(-1) != 0, as_tuple=True)  # [b, T] -> [n']
        pair, pos = torch.cat([pair, err_pair]), torch.cat([pos, err_pos])
        latent = torch.cat([latent, torch.full_like(err_pair, -1)])
        deltas = torch.cat([deltas, diff.error[err_pair, err_pos]])  # [n, D]
        n_heads, n_kv, d_head = self.model.n_heads, self.model.n_kv_heads, self.model.d_head
        q = torch.zeros(len(pair), n_heads, d_head, dtype=deltas.dtype, device=deltas.device)
        k = torch.zeros(len(pair), n_kv, d_head, dtype=deltas.dtype, device=deltas.device)
        with torch.no_grad():
            for t in pos.unique().tolist():
                rows = torch.nonzero(pos == t)[:, 0]
                hidden = (upcast(x[pair[rows], t]) + deltas[rows]).to(x.dtype)[:, None]  # [r, 1, D]
                q_t, k_t = layer_qk(self.model, layer, hidden, t)  # [r, H, 1, E], [r, K, 1, E]
                q[rows], k[rows] = upcast(q_t[:, :, 0]).to(q), upcast(k_t[:, :, 0]).to(k)
        seq_len = x.shape[1]
        self.cost.add_forward(len(pair) * self.share / (seq_len * self.n_layers))
        return _Changed(layer, pair, latent, pos, deltas, q, k)

    def correction(self, dictionary: Dictionary, grads: Mapping[tuple[int, str], torch.Tensor],
                   n_sae: int) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
        """(latents [b, S, T], error [b, T]) to add to the AtP estimates, from one pass's gradients at layer m
        (``grads[(m, "q" | "k" | "pattern")]``); None when the dictionary has no fix or the pass skipped layer m."""
        if dictionary.name not in self.changed:
            return None
        changed = self.changed[dictionary.name]
        m = changed.layer
        if any((m, site) not in grads for site in FIX_SITES):
            return None
        x, q, k = self.base[m]
        with torch.enable_grad():
            (through_qk,) = torch.autograd.grad((q, k), x, (grads[(m, "q")], grads[(m, "k")]), retain_graph=True)
        self.cost.add_backward(x.shape[0] * self.share, layers_covered=1, n_layers=self.n_layers)
        linear = (changed.delta * upcast(through_qk)[changed.pair, changed.pos].to(changed.delta)).sum(-1)  # [n]
        exact = self._exact(changed, upcast(q.detach()), upcast(k.detach()), upcast(grads[(m, "pattern")]))
        fix = exact.to(linear) - linear  # [n]
        b, n_pos = x.shape[0], x.shape[1]
        latents = torch.zeros(b, n_sae, n_pos, dtype=fix.dtype, device=fix.device)
        error = torch.zeros(b, n_pos, dtype=fix.dtype, device=fix.device)
        is_error = changed.latent < 0
        latents[changed.pair[~is_error], changed.latent[~is_error], changed.pos[~is_error]] = fix[~is_error]
        error[changed.pair[is_error], changed.pos[is_error]] = fix[is_error]
        return latents, error

    def _exact(self, changed: _Changed, q: torch.Tensor, k: torch.Tensor, grad_pattern: torch.Tensor) -> torch.Tensor:
        """Σ (A' - A) · ∂L/∂A over heads and the rows >= t each node changes: [n]."""
        args = self.model.attention_args[changed.layer]
        pattern = self.pattern[changed.layer]
        out = torch.zeros(len(changed.pair), dtype=q.dtype, device=q.device)
        for t in changed.pos.unique().tolist():
            rows = torch.nonzero(changed.pos == t)[:, 0]
            pair = changed.pair[rows].to(q.device)
            key = (id(changed), t)
            if key not in self._pattern_changes:
                keys = k[pair].clone()  # [r, K, T, E]
                keys[:, :, t] = changed.k[rows].to(keys)
                queries = q[pair, :, t:].clone()  # [r, H, T - t, E]
                queries[:, :, 0] = changed.q[rows].to(queries)
                new = attention_pattern(queries, keys, args.scaling, args.softcap, args.window)  # [r, H, T - t, T]
                self._pattern_changes[key] = new - pattern[pair, :, t:]  # [r, H, T - t, T]
            grad = grad_pattern[pair, :, t:]  # [r, H, T - t, T]
            out[rows.to(out.device)] = (self._pattern_changes[key] * grad).sum((1, 2, 3))
        return out
