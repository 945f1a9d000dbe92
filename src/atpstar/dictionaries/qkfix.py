"""The QK fix on dictionary latents: the softmax of the attention downstream of a latent, recomputed exactly.

AtP* (Kramár et al. 2024 §4) replaces the linear estimate of a query or key node's effect through the
attention pattern by the exact change of the pattern. A latent (or error node) at position t writes
δ = Δf_i · scale · W_dec[i] (Δerror_t) into the stream that attention layer m reads: m = l for a write at
resid_pre of layer l (``hook_resid_post`` of l - 1), m = l + 1 for attn_out, resid_mid and mlp_out of layer l
(no fix for mlp_in, or past the last layer). With x the base residual stream entering layer m,

    Î_fix = Î_AtP - δ · J_qkᵀ(∂L/∂q, ∂L/∂k)(x)_t + Σ_{h, rows} (A'(q', k') - A) · ∂L/∂A

where J_qkᵀ(...) is the gradient reaching x through layer m's queries and keys only (one vector-Jacobian
product per layer and backward pass, shared by the dictionaries of that layer; the estimator folds it into the
gradient it pulls back, ``through_qk``), and q'_t, k'_t are the layer's query and key at position t computed
exactly from x_t + δ (its norm, projections and rotary; ``Model.run_layers`` stopped after the keys). Only
query row t and key column t change, so A' differs from A in row t and, in rows i > t, in column t only:
there the new row is the old one rescaled, A'_ij = ρ_i A_ij (j != t), with ρ_i = 1 / (1 - A_it + A_it e^{s'_it - s_it}),
so Σ_j (A'_ij - A_ij) G_ij = α_i Σ_{j != t} A_ij (G_ij - G_it) with α_i = ρ_i (A_it - A_it e^{s'_it - s_it}) (both factors
formed without cancelling: α_i is large where row i attended almost only to t).
Row t's change ΔA_t and the α_i depend on the base run only: they are formed once per step (``_Changed``) and
each backward pass (GradDrop's too) only reads its G = ∂L/∂A: two gathers and two sums per changed node.
Latents with Δf = 0 write nothing and are not recomputed. Paths other than layer m's queries and keys stay
linear, as in the node QK fix. Under GradDrop a pass that skips layer m has no path through its attention (no fix).

Cost: one q/k projection of one position per changed latent and error node (counted as 1 / (T · L) of a forward
times the layer's q/k/v weight share), plus one projection of the step's pairs and, per backward pass, its
vector-Jacobian product; recorded in ``info["latent_qk_fix_cost"]``.

Shape letters: b pairs in the step, n changed nodes, H heads, K kv-heads, G = H / K, T positions, E d_head,
D d_model, S d_sae.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..cost import Cost
from ..ops import attention_scores, softcap, upcast, visible_keys
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
    """One dictionary's changed nodes (Δ != 0) and what their exact queries and keys change at layer m."""

    layer: int
    pair: torch.Tensor  # [n]
    latent: torch.Tensor  # [n] (-1: the error node)
    pos: torch.Tensor  # [n]
    row: torch.Tensor  # [n, H, T] A'_t - A_t: the node's own query row
    alpha: torch.Tensor  # [n, H, T] α_i of the rows i > t (0 elsewhere)


@dataclass
class _Base:
    """Layer m of the base run: the stream entering it (requiring grad) with its q and k, and the pattern's parts."""

    x: torch.Tensor  # [b, T, D]
    q: torch.Tensor  # [b, H, T, E] with graph
    k: torch.Tensor  # [b, K, T, E] with graph
    scores: torch.Tensor  # [b, H, T, T] soft-capped, masked (-inf)
    log_norm: torch.Tensor  # [b, H, T] logsumexp of each row
    pattern: torch.Tensor  # [b, H, T, T]
    rest: torch.Tensor  # [b, H, T, T] Σ_{j != t} A_ij at [.., i, t] (no cancellation)


def _others(pattern: torch.Tensor) -> torch.Tensor:
    """Σ_{j != t} A_ij at [.., i, t] of a pattern [.., T, T]: exclusive prefix plus suffix sums (no cancellation)."""
    before = torch.nn.functional.pad(torch.cumsum(pattern, dim=-1)[..., :-1], (1, 0))  # Σ_{j < t}
    after = torch.flip(torch.nn.functional.pad(torch.cumsum(torch.flip(pattern, [-1]), dim=-1)[..., :-1], (1, 0)), [-1])
    return before + after


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
        self.base = {m: self._projection(step, m) for m in sorted(set(self.layers.values()))}
        self.changed = {d.name: self._changed(d, diffs[d.name], self.layers[d.name]) for d in dictionaries
                        if d.name in self.layers}  # fmt: skip

    def _projection(self, step: Any, layer: int) -> _Base:
        """Layer ``layer``'s base stream, its queries and keys (with graph) and its pattern's parts."""
        with torch.enable_grad():
            x = step.base.get("resid_pre", layer).detach().requires_grad_(True)
            q, k = layer_qk(self.model, layer, x, 0)
        self.cost.add_forward(x.shape[0] * self.share / self.n_layers)
        args = self.model.attention_args[layer]
        scores = attention_scores(upcast(q.detach()), upcast(k.detach()), args.scaling, args.softcap, args.window)
        log_norm = torch.logsumexp(scores, dim=-1)  # [b, H, T]
        pattern = torch.exp(scores - log_norm[..., None])  # [b, H, T, T]
        return _Base(x, q, k, scores, log_norm, pattern, _others(pattern))

    def _changed(self, dictionary: Dictionary, diff: Differences, layer: int) -> _Changed:
        base = self.base[layer]
        x = base.x.detach()  # [b, T, D]
        pair, pos, latent = torch.nonzero(diff.latents != 0, as_tuple=True)  # latents [b, T, S]
        err_pair, err_pos = torch.nonzero(diff.error.abs().sum(-1) != 0, as_tuple=True)  # [b, T] -> [n']
        pair, pos = torch.cat([pair, err_pair]), torch.cat([pos, err_pos])
        latent = torch.cat([latent, torch.full_like(err_pair, -1)])
        q_base, k_base = upcast(base.q.detach()), upcast(base.k.detach())
        n_pos = x.shape[1]
        row = torch.zeros(len(pair), q_base.shape[1], n_pos, dtype=q_base.dtype, device=q_base.device)
        alpha = torch.zeros_like(row)
        w_dec = dictionary.W_dec.to(diff.error.device, diff.error.dtype)
        with torch.no_grad():
            for t in pos.unique().tolist():
                rows = torch.nonzero(pos == t)[:, 0]
                is_error = latent[rows] < 0
                amount = diff.latents[pair[rows], t, latent[rows].clamp(min=0)] * diff.scale[pair[rows], t, 0]  # [r]
                deltas = amount[:, None] * w_dec[latent[rows].clamp(min=0)]  # [r, D]
                deltas[is_error] = diff.error[pair[rows][is_error], t]
                hidden = (upcast(x[pair[rows], t]) + deltas).to(x.dtype)[:, None]  # [r, 1, D]
                q_t, k_t = layer_qk(self.model, layer, hidden, t)  # [r, H, 1, E], [r, K, 1, E]
                q_new, k_new = upcast(q_t[:, :, 0]).to(q_base), upcast(k_t[:, :, 0]).to(k_base)
                row[rows], alpha[rows] = self._rows(base, layer, pair[rows], t, q_new, k_new, q_base, k_base)
        self.cost.add_forward(len(pair) * self.share / (n_pos * self.n_layers))
        return _Changed(layer, pair, latent, pos, row, alpha)

    def _rows(self, base: _Base, layer: int, pair: torch.Tensor, t: int, q_new: torch.Tensor, k_new: torch.Tensor,
              q_base: torch.Tensor, k_base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(ΔA_t [r, H, T], α [r, H, T]) of r nodes at position t of pairs ``pair`` [r], with their new queries
        q_new [r, H, E] and keys k_new [r, K, E]."""
        args = self.model.attention_args[layer]
        n_kv, (n_heads, n_pos, d_head) = k_base.shape[1], q_base.shape[1:]
        groups = n_heads // n_kv
        keys = k_base[pair]  # [r, K, T, E] (a copy)
        keys[:, :, t] = k_new
        own = torch.matmul(q_new.view(-1, n_kv, groups, d_head), keys.transpose(-1, -2))  # [r, K, G, T]
        own = softcap(own.reshape(-1, n_heads, n_pos) * args.scaling, args.softcap)  # [r, H, T]
        own = own.masked_fill(~visible_keys(n_pos, n_pos, args.window, own.device)[t], float("-inf"))
        row = torch.softmax(own, dim=-1) - base.pattern[pair, :, t]  # [r, H, T]
        column = torch.empty_like(row)  # q_i · k'_t: [r, H, T]
        for p in pair.unique().tolist():
            mine = torch.nonzero(pair == p)[:, 0]
            queries = q_base[p].reshape(n_kv, groups * n_pos, d_head)  # [K, G*T, E]
            dots = torch.matmul(queries, k_new[mine].permute(1, 2, 0))  # [K, G*T, r_p]
            column[mine] = dots.permute(2, 0, 1).reshape(-1, n_heads, n_pos)  # [r_p, H, T]
        column = softcap(column * args.scaling, args.softcap) - base.log_norm[pair]  # s'_it - L_i
        old = base.scores[pair, :, :, t] - base.log_norm[pair]  # [r, H, T] s_it - L_i = log A_it
        log_new = torch.logaddexp(torch.log(base.rest[pair, :, :, t]), column)  # log(Z'_i / Z_i)
        alpha = torch.exp(old - log_new) - torch.exp(column - log_new)  # ρ_i A_it - A'_it
        later = visible_keys(n_pos, n_pos, args.window, alpha.device)[:, t] & (
            torch.arange(n_pos, device=alpha.device) > t
        )  # [T]
        return row, torch.where(later, alpha, torch.zeros_like(alpha))

    def through_qk(self, dictionary: Dictionary, grads: dict[tuple[int, str], torch.Tensor]) -> torch.Tensor | None:
        """J_qkᵀ(∂L/∂q, ∂L/∂k) [b, T, D] at layer m of this pass (kept in ``grads`` for the layer's other
        dictionaries); None when the dictionary has no fix or the pass skipped layer m."""
        m = self.layers.get(dictionary.name)
        if m is None or any((m, site) not in grads for site in FIX_SITES):
            return None
        if (m, "through_qk") not in grads:
            base = self.base[m]
            with torch.enable_grad():
                (found,) = torch.autograd.grad((base.q, base.k), base.x, (grads[(m, "q")], grads[(m, "k")]),
                                               retain_graph=True)  # fmt: skip
            self.cost.add_backward(base.x.shape[0] * self.share, layers_covered=1, n_layers=self.n_layers)
            grads[(m, "through_qk")] = upcast(found)
        return grads[(m, "through_qk")]

    def exact(self, dictionary: Dictionary, grads: Mapping[tuple[int, str], torch.Tensor],
              n_sae: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(latents [b, S, T], error [b, T]): Σ (A' - A) · ∂L/∂A of every changed node, from this pass's
        ∂L/∂A at layer m (call after ``through_qk`` returned a gradient)."""
        changed = self.changed[dictionary.name]
        base = self.base[changed.layer]
        grad = upcast(grads[(changed.layer, "pattern")]).to(base.pattern)  # [b, H, T, T]
        # c_i - G_it = Σ_{j != t} A_ij (G_ij - G_it) at [.., i, t], summed without cancelling (α_i ~ 1 / Σ_{j != t} A_ij)
        beyond = _others(base.pattern * grad) - base.rest * grad  # [b, H, T, T]
        pair, pos = changed.pair, changed.pos
        own = (changed.row * grad[pair, :, pos]).sum((1, 2))  # [n]
        later = (changed.alpha * beyond[pair, :, :, pos]).sum((1, 2))  # [n]
        fix = own + later
        b, n_pos = base.x.shape[0], base.x.shape[1]
        latents = torch.zeros(b, n_sae, n_pos, dtype=fix.dtype, device=fix.device)
        error = torch.zeros(b, n_pos, dtype=fix.dtype, device=fix.device)
        is_error = changed.latent < 0
        latents[pair[~is_error], changed.latent[~is_error], pos[~is_error]] = fix[~is_error]
        error[pair[is_error], pos[is_error]] = fix[is_error]
        return latents, error
