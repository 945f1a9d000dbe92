"""Attribution patching and AtP*.

Î_AtP(n) = (n(x_source) - n(x_base)) · ∂L/∂n at the base run (spec §3); the QK fix recomputes the
softmax exactly for patched queries/keys (§4); GradDrop averages |Î_l| over runs with layer l's
residual write dropped from the backward graph, ĉ = Σ_l |Î_l| / (L - 1) (§5).
Cost per pair: 2 forwards + 1 backward; GradDrop adds partial backwards from every layer l, each
counted l / L (about L/2 backwards in all), the exact cheap scheme of §5.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..batching import BatchGuard
from ..cost import Cost
from ..errors import InputError
from ..families import LayerAttention
from ..gradients import GradientStep, atp_estimate, gradient_step
from ..memory import MemoryPlan, gradient_plan
from ..model import Model
from ..nodes import ALL_TYPES, NODE_TABLE, node_shape
from ..ops import accumulation_dtype, graddrop_combine, key_fix, query_fix, upcast
from ..pairs import PromptPairs
from ..progress import progress_bar
from ..sink import PerPairSink, check_keep
from ..validate import check_batching
from .base import Method, check_edge_positions, register


@register(
    "atp*",
    summary="AtP + QK fix + GradDrop, the paper's method (about 2 forwards + L/2+1 backwards per pair)",
    qk_fix=True,
    grad_drop=True,
)
@register(
    "atp+graddrop",
    summary="AtP averaged over backward passes with one layer's residual write dropped (cancellation fix)",
    qk_fix=False,
    grad_drop=True,
)
@register(
    "atp+qkfix",
    summary="AtP with the softmax recomputed exactly for queries and keys (attention saturation fix)",
    qk_fix=True,
    grad_drop=False,
)
@register(  # decorators apply bottom-up: this order lists atp first
    "atp",
    summary="attribution patching: first-order estimate, 2 forwards + 1 backward per pair",
    qk_fix=False,
    grad_drop=False,
)
class AttributionPatching(Method):
    """AtP and its fixes; the method ids fix ``qk_fix`` and ``grad_drop``.

    ``per_pair`` holds signed Î_AtP for ``atp`` and ``atp+qkfix``, and the GradDrop score
    Σ_l |Î_l| / (L - 1) (non-negative) for ``atp+graddrop`` and ``atp*``. ``scores`` is the mean of
    absolute per-pair values.

    GradDrop needs depth: a node at layer m scores m·|Î_AtP| plus its terms for dropped layers above
    it, so a layer-0 node whose only route to the metric runs through layer 1 scores 0 in a 2-layer
    model (true of the formula, not an approximation). Prefer ``atp+qkfix`` on very shallow models.

    Half-precision models (bfloat16/float16) run their passes in their own dtype; every estimate
    (source - base differences, their products with gradients, the QK fix, GradDrop's sums) is
    computed and kept in float32.

    Args:
        batch_size: prompt pairs per forward/backward; None picks the most that fit in ``memory_gb``.
        memory_gb: bound on the run's memory besides the model's weights (one batch's autograd graph,
            activations and gradients, plus results kept in memory when the model runs on the CPU).
            The prediction is in ``info["memory"]`` and in the progress output.
        keep: ``"all"`` keeps dense ``per_pair`` [P, *layout]; ``"top"`` keeps, per pair and node type,
            only the ``top_k`` largest |estimates| (``per_pair`` is then a sparse COO tensor of the same
            shape); ``"disk"`` keeps the top-k too and streams the full per-pair tensors to safetensors
            shards in ``out_dir`` (``atpstar.read_per_pair``). ``scores`` are exact in every mode.
        top_k: entries per pair and node type kept by ``"top"``/``"disk"``.
        out_dir: folder for ``"disk"`` shards (must not hold shards already).
        edge_positions: position-resolved edges, ``per_pair["edge"]`` [P, N, T] (``check_edge_positions``).
    """

    needs_gradients = True
    node_types = ALL_TYPES  # edges: EAP and its QK-fix / GradDrop / AtP* forms (``atpstar.edges``)
    engines = ("sites", "edges")

    def __init__(
        self,
        *,
        qk_fix: bool = False,
        grad_drop: bool = False,
        batch_size: int | None = None,
        memory_gb: float = 2.0,
        keep: str = "all",
        top_k: int = 100,
        out_dir: str | None = None,
        edge_positions: bool = False,
    ) -> None:
        self.qk_fix = qk_fix
        self.grad_drop = grad_drop
        self.batch_size = batch_size
        self.memory_gb = memory_gb
        self.keep = keep
        self.top_k = top_k
        self.out_dir = out_dir
        self.edge_positions = edge_positions

    def expected_cost(self, model: Model, pairs: PromptPairs, node_types: list[str], info: Mapping[str, Any]) -> Cost:
        """2 forwards and 1 backward per pair; GradDrop adds a partial backward from each layer l >= 1, counted l / L."""
        cost = Cost()
        cost.add_forward(2 * pairs.n_pairs)
        cost.add_backward(pairs.n_pairs)
        if self.grad_drop:
            for layer in range(1, model.n_layers):
                cost.add_backward(pairs.n_pairs, layers_covered=layer, n_layers=model.n_layers)
        return cost

    def _validate(self, model: Model, pairs: PromptPairs, node_types: list[str]) -> None:
        if self.grad_drop and model.n_layers < 2:
            raise InputError("GradDrop needs a model with at least 2 layers (it averages over L - 1 dropped layers)")
        self.batch_size, self.memory_gb = check_batching(self.batch_size, self.memory_gb)
        check_keep(self.keep, self.top_k, self.out_dir)
        check_edge_positions(self.edge_positions, node_types)

    def memory_plan(self, model: Model, n_pairs: int, seq_len: int, node_types: list[str]) -> MemoryPlan:
        return gradient_plan(
            model,
            self.id,
            n_pairs,
            seq_len,
            node_types,
            qk_fix=self.qk_fix,
            grad_drop=self.grad_drop,
            keep=self.keep,
            top_k=self.top_k,
            batch_size=self.batch_size,
            memory_gb=self.memory_gb,
            consumed=True,
        )

    def _attribute(
        self, model: Model, pairs: PromptPairs, node_types: list[str], direction: str, cost: Cost, progress: bool
    ) -> tuple[dict[str, torch.Tensor] | PerPairSink, dict[str, torch.Tensor], dict[str, Any]]:
        shapes = {t: node_shape(t, model.sizes, pairs.seq_len) for t in node_types}
        dtype = accumulation_dtype(model.dtype)
        sink = PerPairSink(shapes, pairs.n_pairs, dtype, self.keep, self.top_k, self.out_dir, self.aggregation)
        guard = BatchGuard(f"{self.id}: pairs", model.device)
        guard.limit = self.memory_plan(model, pairs.n_pairs, pairs.seq_len, node_types).batch

        def step(part: slice) -> None:
            index = torch.arange(part.start, part.stop)
            sink.add(index, self._estimate(model, pairs, index, node_types, direction, cost))
            bar.update(len(index))

        with progress_bar(pairs.n_pairs, self.id, progress, unit="pair") as bar:
            guard.run(pairs.n_pairs, step)
        info = {"oom_retries": guard.retries} if guard.retries else {}
        return (sink.per_pair() if self.keep == "all" else sink), {}, info

    def _attribute_edges(
        self, model: Model, pairs: PromptPairs, direction: str, cost: Cost, progress: bool
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        from ..edges.sweep import estimate_edges

        return estimate_edges(
            model,
            pairs,
            direction,
            cost,
            progress,
            self.batch_size,
            self.memory_gb,
            self.qk_fix,
            self.grad_drop,
            positions=self.edge_positions,
        )

    def _estimate(
        self, model: Model, pairs: PromptPairs, index: torch.Tensor, node_types: list[str], direction: str, cost: Cost
    ) -> dict[str, torch.Tensor]:
        """Per-pair estimates for the pairs ``index``: node type -> [b, *layout].

        Source - base is formed during the base forward; each site's gradient is turned into estimates inside
        the backward, as soon as autograd forms it, and then dropped (without GradDrop the site's difference
        goes too). So a batch holds the graph, the differences and the estimates, never the gradients of
        every site at once, nor both runs' activations.
        """
        fix = self.qk_fix and bool({"query", "key"} & set(node_types))
        from_site: dict[str, list[str]] = {}  # grad site -> node types estimated from its gradient
        for t in node_types:
            from_site.setdefault("pattern" if fix and t in ("query", "key") else NODE_TABLE[t].site, []).append(t)
        # what each grad site's estimates read: the QK fix queries, keys and the pattern, the rest source - base
        reads: dict[str, tuple[str, ...]] = {
            site: ("q", "k", "pattern") if site == "pattern" else (site,) for site in from_site
        }
        with gradient_step(
            model,
            pairs,
            index,
            direction=direction,
            sites=["q", "k"] if fix else [],
            diff_sites=[site for site in from_site if site != "pattern"],
            grad_sites=list(from_site),
            cost=cost,
            grad_drop=self.grad_drop,
        ) as step:
            return self._backward_passes(step, model, node_types, from_site, reads, fix)

    def _backward_passes(
        self,
        step: GradientStep,
        model: Model,
        node_types: list[str],
        from_site: dict[str, list[str]],
        reads: dict[str, tuple[str, ...]],
        fix: bool,
    ) -> dict[str, torch.Tensor]:
        """Run the step's backward passes, folding each site's gradient into estimates as it comes."""
        n_layers, attention_args = model.n_layers, model.attention_args
        per_layer: dict[str, dict[int, torch.Tensor]] = {t: {} for t in node_types}  # t -> layer -> [b, *layout[1:]]

        def estimate(layer: int, node_type: str, grad: torch.Tensor) -> torch.Tensor:
            return _node_estimate(step, attention_args[layer], node_type, layer, grad, fix)

        if not self.grad_drop:

            def keep_plain(layer: int, site: str, grad: torch.Tensor) -> None:
                for t in from_site[site]:
                    per_layer[t][layer] = estimate(layer, t, grad)
                for read in reads[site]:
                    step.release(read, layer)

            step.backward(keep_plain)
            return {t: _stack([v[m] for m in range(n_layers)]) for t, v in per_layer.items()}  # [b, *layout]

        # ĉ = Σ_l |Î_l| / (L - 1). A node at layer m keeps its plain estimate when any of the m layers below
        # it is dropped, and scores 0 when its own layer is; layers above it need a partial backward. Only
        # the running sums live on: the plain estimates and every dropped layer's are folded in as formed.
        def start_sums(layer: int, site: str, grad: torch.Tensor) -> None:
            for t in from_site[site]:
                per_layer[t][layer] = layer * estimate(layer, t, grad).abs()

        def add_dropped(layer: int, site: str, grad: torch.Tensor) -> None:
            for t in from_site[site]:
                per_layer[t][layer].add_(estimate(layer, t, grad).abs())

        step.backward(start_sums)
        for site in {*from_site, *(("q", "k") if fix else ())}:  # the top layer is never below a dropped layer
            step.release(site, n_layers - 1)
        for _ in step.dropped(add_dropped):
            pass
        return {t: graddrop_combine(_stack([v[m] for m in range(n_layers)]), n_layers) for t, v in per_layer.items()}


def _node_estimate(
    step: GradientStep, args: LayerAttention, node_type: str, layer: int, grad: torch.Tensor, fix: bool
) -> torch.Tensor:
    """Estimates of the nodes of one type at one layer, [b, *layout[1:]], from the gradient at their grad site."""
    base, source = step.base, step.source
    with torch.no_grad():
        if fix and node_type == "query":
            return query_fix(
                upcast(source.get("q", layer)),  # [b, H, T, E]
                upcast(base.get("k", layer).detach()),  # [b, K, T, E]
                upcast(base.get("pattern", layer).detach()),  # [b, H, T, T]
                upcast(grad),  # ∂L/∂pattern [b, H, T, T]
                args.scaling,  # scaling, soft-cap and window of this layer's scores
                args.softcap,
                args.window,
            )  # [b, H, T]
        if fix and node_type == "key":
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


def _stack(per_layer: list[torch.Tensor]) -> torch.Tensor:
    """L x [b, ...] -> [b, L, ...] on the first layer's device (layers of a dispatched model differ)."""
    device = per_layer[0].device
    return torch.stack([est.to(device) for est in per_layer], 1)
