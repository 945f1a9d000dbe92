"""Attribution patching and AtP*.

Î_AtP(n) = (n(x_source) - n(x_base)) · ∂L/∂n at the base run (Kramár et al. 2024); the QK fix recomputes the
softmax exactly for patched queries/keys (§4); GradDrop averages |Î_l| over runs with layer l's
residual write dropped from the backward graph, ĉ = Σ_l |Î_l| / (L - 1) (§5).
Cost per pair: 2 forwards + 1 backward; GradDrop adds partial backwards from every layer l, each
counted l / L (about L/2 backwards in all), the exact cheap scheme of §5.

Built on ``gradients.gradient_step``: a subclass changes where the gradient is taken (``_points``;
``atp+ig`` takes a path) and keeps the batch loop, out-of-memory retry, sinks and edge entry point.

Shape letters: P pairs, b pairs in a batch, L layers.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from ..batching import BatchGuard
from ..cost import Cost
from ..errors import InputError
from ..gradients import AT_BASE, Points, gradient_step
from ..gradients.consumers import diff_rows, node_estimates, plan_sites
from ..job import Job
from ..memory import MemoryPlan, gradient_plan
from ..model import Model
from ..nodes import node_shape
from ..ops import accumulation_dtype
from ..pairs import PromptPairs
from ..progress import progress_bar
from ..sink import PerPairSink, check_keep
from ..spaces import BUILTIN_TYPES, space_class
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
        edge_convention: what a head sends on a post-norm model (Gemma-2/3, OLMo-2): ``"atpstar"`` (its
            share of the normalised write) or ``"mib"`` (its write before the norm, as MIB; design record 0019).
    """

    needs_gradients = True
    node_types = BUILTIN_TYPES  # edges: EAP and its QK-fix / GradDrop / AtP* forms (``atpstar.edges``)
    engines = ("sites", "edges", "latents")

    qk_fix: bool = False
    grad_drop: bool = False
    batch_size: int | None = None
    memory_gb: float = 2.0
    keep: str = "all"
    top_k: int = 100
    out_dir: str | None = None
    edge_positions: bool = False
    edge_convention: str = "atpstar"

    def expected_cost(self, model: Model, pairs: PromptPairs, node_types: list[str], info: Mapping[str, Any]) -> Cost:
        """2 forwards and 1 backward per pair; GradDrop adds a partial backward from each layer l >= 1, counted l / L.

        Edges add the receivers' input copies (3H prompts through each layer's q/k/v share, forward and
        backward, per gradient pass), and the QK fix one q/k projection per upstream sender and layer.
        Dictionary latents under the QK fix add the projections of the latents that changed
        (``info["latent_qk_fix_cost"]``, ``atpstar.dictionaries.qkfix``).
        """
        n, n_layers = pairs.n_pairs, model.n_layers
        cost = Cost()
        for engine in dict.fromkeys(space_class(t).engine for t in node_types):
            cost.add_forward(2 * n)
            cost.add_backward(n)
            if self.grad_drop:
                for layer in range(1, n_layers):
                    cost.add_backward(n, layers_covered=layer, n_layers=n_layers)
            if engine == "edges":
                cost = cost + _edge_extra_cost(model, n, self.qk_fix, self.grad_drop)
        latent_fix = info.get("latent_qk_fix_cost", {})  # q/k projections of the latents that changed
        return cost + Cost(latent_fix.get("forward", 0.0), latent_fix.get("backward", 0.0))

    def _validate(self, model: Model, pairs: PromptPairs, node_types: list[str]) -> None:
        if self.grad_drop and model.n_layers < 2:
            raise InputError("GradDrop needs a model with at least 2 layers (it averages over L - 1 dropped layers)")
        self.batch_size, self.memory_gb = check_batching(self.batch_size, self.memory_gb)
        check_keep(self.keep, self.top_k, self.out_dir)
        check_edge_positions(self.edge_positions, node_types)
        dense = [t for t in node_types if space_class(t).engine != "sites"]
        if self.keep != "all" and dense:
            warnings.warn(
                f"atpstar: {self.id}: keep={self.keep!r} applies to site node types; {dense} results are kept "
                "dense (all pairs in memory)",
                stacklevel=3,
            )

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
            points=self._points(),
        )

    def _points(self) -> Points:
        """Where the gradient is taken: the base run (``atp+ig`` takes a path of interpolated inputs)."""
        return AT_BASE

    def _attribute(
        self, model: Model, pairs: PromptPairs, node_types: list[str], direction: str, cost: Cost, progress: bool
    ) -> tuple[dict[str, torch.Tensor] | PerPairSink, dict[str, torch.Tensor], dict[str, Any]]:
        shapes = {t: node_shape(t, model.sizes, pairs.seq_len) for t in node_types}
        dtype = accumulation_dtype(model.dtype)
        sink = PerPairSink(shapes, pairs.n_pairs, dtype, self.keep, self.top_k, self.out_dir, self.aggregation)
        guard = BatchGuard(f"{self.id}: pairs", model.device)
        guard.limit = self.memory_plan(model, pairs.n_pairs, pairs.seq_len, node_types).batch

        # On the CPU the estimates are written straight into the result's rows (no second copy of the results).
        in_place = self.keep == "all" and model.device.type == "cpu"

        def step(part: slice) -> None:
            index = torch.arange(part.start, part.stop)
            into = {t: sink.dense[t][part] for t in node_types} if in_place else None
            sink.add(index, self._estimate(model, pairs, index, node_types, direction, cost, into))
            bar.update(len(index))

        with progress_bar(pairs.n_pairs, self.id, progress, unit="pair") as bar:
            guard.run(pairs.n_pairs, step)
        info = {"oom_retries": guard.retries} if guard.retries else {}
        return (sink.per_pair() if self.keep == "all" else sink), {}, info

    def _attribute_edges(
        self, model: Model, pairs: PromptPairs, direction: str, cost: Cost, progress: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        """EAP and its QK-fix / GradDrop / AtP* forms at the base run; EAP-IG on ``atp+ig``'s path (GradDrop
        forms add the extra ``"sign"``, the sign of the estimate before GradDrop, for MIB's signed scores)."""
        from ..edges.estimate import estimate_edges

        options = {"qk_fix": self.qk_fix, "grad_drop": self.grad_drop, "positions": self.edge_positions}
        job = Job(model, pairs, direction, cost, progress)
        return estimate_edges(
            job,
            batch_size=self.batch_size,
            memory_gb=self.memory_gb,
            points=self._points(),
            convention=self.edge_convention,
            **options,
        )

    def _attribute_latents(self, job: Job, space: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Dictionary latents and errors (``atpstar.dictionaries.estimate``), on the same points and fixes."""
        from ..dictionaries.estimate import latent_estimates

        return latent_estimates(
            job, space.ordered, grad_drop=self.grad_drop, qk_fix=self.qk_fix, points=self._points(),
            batch_size=self.batch_size, label=self.id,
        )  # fmt: skip

    def _estimate(
        self,
        model: Model,
        pairs: PromptPairs,
        index: torch.Tensor,
        node_types: list[str],
        direction: str,
        cost: Cost,
        into: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-pair estimates for the pairs ``index``: node type -> [b, *layout].

        Source - base is formed during the base forward; each site's gradient is turned into estimates inside
        the backward, as soon as autograd forms it, and then dropped (without GradDrop the site's difference
        goes too). So a batch holds the graph, the differences and the estimates, never the gradients of
        every site at once, nor both runs' activations.
        """
        plan = plan_sites(node_types, self.qk_fix)
        with gradient_step(
            model,
            pairs,
            index,
            direction=direction,
            sites=plan.sites,
            diff_sites=plan.diff_sites,
            grad_sites=plan.grad_sites,
            cost=cost,
            grad_drop=self.grad_drop,
            points=self._points(),
            diff_into=diff_rows(node_types, into),  # a neuron's difference waits in its own result entry
        ) as step:
            return node_estimates(step, model.attention_args, node_types, plan, into)


def _edge_extra_cost(model: Model, n_pairs: int, qk_fix: bool, grad_drop: bool) -> Cost:
    """What edge estimates add to a gradient step: receiver copies per pass, the QK fix's projections."""
    from ..edges.graph import graph_of
    from ..edges.sites import qkv_share

    share, n_layers = qkv_share(model), model.n_layers
    copies = 3 * model.n_heads * n_pairs * share  # one full backward's copies (all layers)
    passes = 1.0 + (sum(range(1, n_layers)) / n_layers if grad_drop else 0.0)  # in full backwards
    extra = Cost(forward=copies * passes, backward=copies * passes)
    if qk_fix:
        graph = graph_of(model)
        ups = sum(graph.senders_before(graph.qkv_receiver(layer, "q", 0)) for layer in range(n_layers))
        extra.forward += n_pairs * ups * share / n_layers
    return extra
