"""What node estimators do with a site's gradient: the AtP product, the QK fix, GradDrop's running sums.

- Product: Î(n) = (n(x_source) - n(x_base)) · ∂L/∂n (``step.atp_estimate``; on a path the gradient summed
  over the points, over m).
- QK fix (Kramár et al. 2024 §4): for a query or key node the softmax is recomputed exactly with that
  one vector taken from the source run, Î = Σ (A' - A) · ∂L/∂A (``ops.query_fix``, ``ops.key_fix``).
- GradDrop (§5): ĉ = Σ_l |Î_l| / (L - 1). A node at layer m keeps its plain estimate when any of the m
  layers below it is dropped and scores 0 when its own layer is; layers above it need a partial backward
  (``Tape.dropped``). Only the running sums live on.

Cost: none beyond the step's passes (the QK fix is O(T² E) per head and layer, no forward).

Shape letters: b pairs in the step, L layers, H heads, K kv-heads, T positions, E d_head, M d_mlp.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..families import LayerAttention
from ..nodes import NODE_TABLE
from ..ops import key_fix, query_fix, upcast
from .step import GradientStep, atp_estimate, summed_over_points

QK_SITES = ("q", "k")  # the sites whose nodes the QK fix recomputes exactly (through ∂L/∂pattern)


@dataclass(frozen=True)
class SitePlan:
    """Which runner sites a step needs for some node types.

    Attributes:
        fix: the QK fix applies (asked for, and some node type reads a q or k site).
        from_site: grad site -> node types estimated from its gradient (``pattern`` for q/k nodes under the fix).
        reads: grad site -> the sites its estimates read (released once they are formed).
    """

    fix: bool
    from_site: dict[str, list[str]]
    reads: dict[str, tuple[str, ...]]

    @property
    def sites(self) -> list[str]:
        """Sites both runs keep: the QK fix's queries and keys."""
        return list(QK_SITES) if self.fix else []

    @property
    def diff_sites(self) -> list[str]:
        return [site for site in self.from_site if site != "pattern"]

    @property
    def grad_sites(self) -> list[str]:
        return list(self.from_site)


def plan_sites(node_types: Sequence[str], qk_fix: bool) -> SitePlan:
    """The sites of a step estimating ``node_types`` (with the QK fix when ``qk_fix``)."""
    fix = qk_fix and any(NODE_TABLE[t].site in QK_SITES for t in node_types)
    from_site: dict[str, list[str]] = {}
    for t in node_types:
        site = NODE_TABLE[t].site
        from_site.setdefault("pattern" if fix and site in QK_SITES else site, []).append(t)
    # the QK fix reads queries, keys and the pattern; the rest source - base at their own site
    reads: dict[str, tuple[str, ...]] = {
        site: (*QK_SITES, "pattern") if site == "pattern" else (site,) for site in from_site
    }
    return SitePlan(fix, from_site, reads)


def node_estimate(
    step: GradientStep, args: LayerAttention, node_type: str, layer: int, grad: torch.Tensor, fix: bool
) -> torch.Tensor:
    """Estimates of the nodes of one type at one layer, [b, *layout[1:]], from the gradient at their grad site
    (∂L/∂pattern for query and key nodes under the QK fix)."""
    base, source = step.base, step.source
    with torch.no_grad():
        site = NODE_TABLE[node_type].site
        if fix and site == "q":
            return query_fix(
                upcast(source.get("q", layer)),  # [b, H, T, E]
                upcast(base.get("k", layer).detach()),  # [b, K, T, E]
                upcast(base.get("pattern", layer).detach()),  # [b, H, T, T]
                upcast(grad),  # ∂L/∂pattern [b, H, T, T]
                args.scaling,  # scaling, soft-cap and window of this layer's scores
                args.softcap,
                args.window,
            )  # [b, H, T]
        if fix and site == "k":
            return key_fix(
                upcast(base.get("q", layer).detach()),
                upcast(base.get("k", layer).detach()),
                upcast(source.get("k", layer)),
                upcast(grad),
                args.scaling,
                args.softcap,
                args.window,
            )  # [b, K, T]
        return atp_estimate(step, node_type, layer, grad)  # [b, T, M] or [b, H|K, T]


def node_estimates(
    step: GradientStep,
    attention_args: Sequence[LayerAttention],
    node_types: list[str],
    plan: SitePlan,
    into: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Run the step's backward passes, folding each site's gradient into estimates as it comes.

    With GradDrop the passes run layer by layer from the top (``GradientStep.streamed``): a layer's GradDrop
    sum is complete after its turn, goes into the result, and the layer's graph, differences and records go.

    Args:
        attention_args: per layer, the attention's scaling, soft-cap and window (the QK fix).
        node_types: the node types to estimate.
        plan: the step's sites (``plan_sites``).
        into: optional node type -> [b, *layout] tensors in the estimates' dtype (e.g. the result's rows of
            these pairs) that the estimates are written into layer by layer, so no second copy of the results
            exists; returned filled. They may hold the step's differences (``diff_rows``).

    Returns:
        node type -> [b, *layout]: Î (AtP, on a path IG) or GradDrop's ĉ with ``step.grad_drop``.
    """
    n_layers, from_site, reads, fix = len(attention_args), plan.from_site, plan.reads, plan.fix
    out = _Layers(n_layers, into)  # node type -> [b, L, *layout[1:]], written layer by layer as gradients arrive

    def estimate(layer: int, node_type: str, grad: torch.Tensor) -> torch.Tensor:
        return node_estimate(step, attention_args[layer], node_type, layer, grad, fix)

    if not step.grad_drop:

        def keep_plain(layer: int, site: str, grad: torch.Tensor) -> None:
            # every estimate reads the difference before a row (which may hold it, ``diff_rows``) is written
            for t, est in [(t, estimate(layer, t, grad)) for t in from_site[site]]:
                out.put(t, layer, est)
            for read in reads[site]:
                step.release(read, layer)

        step.backward(summed_over_points(step, keep_plain))
        return out.tensors(node_types)  # [b, *layout]

    running: dict[str, torch.Tensor] = {}  # node type -> the running sum of the layer in turn, [b, *layout[1:]]

    def start_sums(layer: int, site: str, grad: torch.Tensor) -> None:
        for t in from_site[site]:
            running[t] = layer * estimate(layer, t, grad).abs_()  # the m layers below leave it unchanged

    def add_dropped(layer: int, site: str, grad: torch.Tensor) -> None:
        for t in from_site[site]:
            running[t].add_(estimate(layer, t, grad).abs_())

    def done(layer: int) -> None:  # the layer's sums are complete: into the result, its differences and records go
        for t in node_types:
            out.put(t, layer, running.pop(t))
        for site in from_site:
            for read in reads[site]:
                step.release(read, layer)

    step.streamed(start_sums, add_dropped, done)  # the full backward, then l = layer+1 .. L-1, layer by layer
    step.close()  # the differences and records go before the results are combined
    sums = out.tensors(node_types)
    return {t: sums[t].div_(n_layers - 1) for t in node_types}  # graddrop_combine, in place


def diff_rows(node_types: Sequence[str], into: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Diff site -> the result rows [b, L, ...] of its node type, where the step may keep the site's differences
    (``gradient_step(diff_into=...)``: used where a layer's rows have the activation's shape, i.e. one node per
    activation entry). ``node_estimates`` writes a layer's rows only after its last read of that difference."""
    return {NODE_TABLE[t].site: into[t] for t in node_types if into is not None and t in into}


class _Layers:
    """Per node type one [b, L, *layout[1:]] tensor, filled layer by layer (no per-layer list to stack).

    Allocated at the first layer's estimate unless given; an estimate on another device (a dispatched model)
    is moved there, and the whole tensor to layer 0's device at the end, as stacking the layers did.
    """

    def __init__(self, n_layers: int, into: dict[str, torch.Tensor] | None = None) -> None:
        self.n_layers = n_layers
        self._out: dict[str, torch.Tensor] = dict(into or {})
        self._device: dict[str, torch.device] = {}

    def put(self, node_type: str, layer: int, est: torch.Tensor) -> None:
        if node_type not in self._out:
            shape = (est.shape[0], self.n_layers, *est.shape[1:])
            self._out[node_type] = torch.empty(shape, dtype=est.dtype, device=est.device)
        if layer == 0:
            self._device[node_type] = est.device
        self.at(node_type, layer).copy_(est)

    def at(self, node_type: str, layer: int) -> torch.Tensor:
        """The view [b, *layout[1:]] of ``layer``."""
        return self._out[node_type][:, layer]

    def tensors(self, node_types: list[str]) -> dict[str, torch.Tensor]:
        return {t: self._out[t].to(self._device.get(t, self._out[t].device)) for t in node_types}
