"""The state of one ``atpstar.find`` call: its population, what was verified, costs, and the result.

Every expensive step (the estimate, each verification call, each bound) goes through the call's
``FindJournal`` (``find_resume``), so an interrupted call resumes without redoing completed steps.
Nodes of every type lie on one flat axis (``check_node_types`` order); edges are one type with the
layout [N edges] (``atpstar.edges``).

Shape letters: P pairs, N nodes (all node types, flattened), K nodes of one step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .bound import FalseNegativeBound, false_negative_bound
from .cost import Cost
from .engine import PatchCache, element_bytes, prepare
from .engine import patch_listed as patch_ranked
from .find_resume import FindJournal, digest
from .localization import STAGES, Localization, bound_from_parts, bound_parts
from .model import Model
from .nodes import EDGE_TYPE, node_shape, unit_and_pos
from .pairs import PromptPairs
from .progress import progress_bar
from .result import Attribution
from .validate import batch_for_memory, check_batch_size
from .verify import Verification, verify

# |c| within this fraction of θ counts as >= θ: float32 patching differs by ~1e-7 between batchings.
THETA_TOLERANCE = 1e-5
NO_ASSUMPTION = "None: every node was verified by exact activation patching."


def population(model: Model, node_types: list[str], seq_len: int) -> tuple[dict[str, tuple[int, ...]], torch.Tensor]:
    """(layout per node type, [N] forward cost of patching each node on one pair).

    A node at layer l costs (L - l) / L of a forward (the patched run starts at its layer). An edge into
    a q/k/v receiver at layer l costs the same plus 1/L for its receiver's own copy of the layer input;
    an edge into the logits costs no forward (``edges.patching``).
    """
    if node_types == [EDGE_TYPE]:
        from .edges.graph import graph_of

        graph = graph_of(model)
        per_layer = 3 * model.n_heads + 1  # receivers of one layer: q, k, v of every head, then the MLP
        receiver = graph.receiver_index  # [N]
        layer = torch.clamp(receiver // per_layer, max=model.n_layers)  # logits: L
        qkv = (layer < model.n_layers) & (receiver - layer * per_layer < 3 * model.n_heads)
        weight = (model.n_layers - layer + qkv.long()).double() / model.n_layers  # [N]
        return {EDGE_TYPE: (graph.n_edges,)}, weight
    shapes = {t: node_shape(t, model.sizes, seq_len) for t in node_types}
    layers = torch.cat(
        [
            torch.arange(shapes[t][0]).repeat_interleave(math.prod(shapes[t][1:]))  # layer is axis 0 of every layout
            for t in node_types
        ]
    )
    return shapes, (model.n_layers - layers).double() / model.n_layers


@dataclass
class Search:
    """Mutable state of one ``find`` call: the population, what was verified, costs and history."""

    model: Model
    pairs: PromptPairs
    node_types: list[str]
    shapes: dict[str, tuple[int, ...]]
    weight: torch.Tensor  # [N] forward cost (L - l) / L of patching each node on one pair
    direction: str
    budget: float | None
    progress: bool
    batch_size: int | None
    engine: dict[str, Any]  # workers / ray_address for verify and the bounds
    journal: FindJournal
    estimate_score: torch.Tensor = field(init=False)  # [N] the estimator's aggregate score per node
    verified: torch.Tensor = field(init=False)  # [N] bool
    order: list[int] = field(default_factory=list)  # flat index of each verified node, in order
    effects: list[torch.Tensor] = field(default_factory=list)  # per verified node: [P]
    stage_of: list[str] = field(default_factory=list)
    base_metric: torch.Tensor | None = None
    cost: dict[str, Cost] = field(default_factory=dict)
    edge_graph: dict[str, Any] | None = None  # the edge graph's description when the nodes are edges

    def __post_init__(self) -> None:
        self.verified = torch.zeros(len(self.weight), dtype=torch.bool)
        self.estimate_score = torch.zeros(len(self.weight), dtype=torch.float64)
        if self.node_types == [EDGE_TYPE]:
            from .edges.graph import graph_of

            self.edge_graph = graph_of(self.model).describe()

    @property
    def spent(self) -> float:
        return sum(c.forward_equivalents for c in self.cost.values())

    @property
    def left(self) -> float:
        return math.inf if self.budget is None else self.budget - self.spent

    def add_cost(self, stage: str, cost: Cost) -> None:
        self.cost[stage] = self.cost.get(stage, Cost()) + cost

    def unflatten(self, flat: int) -> tuple[str, tuple[int, ...]]:
        for t in self.node_types:
            size = math.prod(self.shapes[t])
            if flat < size:
                return t, tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), self.shapes[t]))
            flat -= size
        raise IndexError(flat)

    def verify_cost(self, flat: torch.Tensor) -> torch.Tensor:
        """[k] forward equivalents of verifying the first 1..k nodes of ``flat`` in one call."""
        n_pairs = self.pairs.n_pairs
        return n_pairs * (2.0 + self.weight[flat].cumsum(0))

    def affordable(self, flat: torch.Tensor) -> int:
        """How many of ``flat`` (in order) one verify call can patch within the budget."""
        if self.budget is None or len(flat) == 0:
            return len(flat)
        return int((self.verify_cost(flat) <= self.left + 1e-9).sum())

    def sample_cost(self, p: float) -> float:
        """Forward equivalents of one joint patch of the bound at inclusion probability ``p``: 1 for nodes; for
        edges, also the q/k/v receiver copies a patch needs (``edges.subsampling.joint_patch_cost``)."""
        if self.edge_graph is None:
            return 1.0
        from .edges.subsampling import joint_patch_cost

        return joint_patch_cost(self.model, ~self.verified, p)

    def estimate(self, estimator: str, options: dict[str, Any], compute: Any) -> tuple[torch.Tensor, str]:
        """Run (or replay) the estimator: ([P, N] per-pair scores, method id); sets ``estimate_score``."""

        def run() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
            result: Attribution = compute()
            tensors = {
                "scores": torch.cat([result.scores[t].double().flatten() for t in self.node_types]),  # [N]
                "per_pair": torch.cat([result.per_pair[t].double().flatten(1) for t in self.node_types], 1),  # [P, N]
            }
            return {"method": result.method, "cost": result.cost.to_dict()}, tensors

        facts, tensors = self.journal.step("estimate", {"method": estimator, "options": options}, run)
        self.use_estimate(tensors["scores"], Cost.from_dict(facts["cost"]))
        return tensors["per_pair"], str(facts["method"])

    def use_estimate(self, scores: torch.Tensor, cost: Cost) -> None:
        self.estimate_score = scores
        self.add_cost("estimate", cost)

    def verify(self, flat: torch.Tensor, stage: str) -> torch.Tensor:
        """Patch the nodes ``flat`` exactly (the batched engine, as ``atpstar.verify``): [k, P] effects."""
        if len(flat) == 0:
            return torch.zeros(0, self.pairs.n_pairs, dtype=torch.float64)
        key = {"stage": stage, "n": len(flat), "nodes": digest(flat.long())}
        if self.edge_graph is None and all(v is None for v in self.engine.values()):
            effects = self._verify_by_layer(flat, stage, key)
        else:  # edges, or Ray workers: one ``atpstar.verify`` call, one journal step
            facts, tensors = self.journal.step("verify", key, lambda: self._verify(flat))
            self.add_cost(stage, Cost.from_dict(facts["cost"]))
            self.base_metric = tensors["base_metric"]
            effects = tensors["effects"]  # [k, P], rows in the order of flat
        self.verified[flat] = True
        self.order.extend(int(i) for i in flat)
        self.effects.extend(effects)
        self.stage_of.extend([stage] * len(flat))
        return effects

    def _verify_by_layer(self, flat: torch.Tensor, stage: str, key: dict[str, Any]) -> torch.Tensor:
        """In-process verification of ``flat`` as one journal step per layer: [k, P] effects.

        The same forwards as one ``atpstar.verify`` call (it too patches layer by layer, each layer's nodes in
        rank order, in the same batches), so the numbers are the same; a kill loses at most one layer's work.
        Each step records the call's running cost (base and source runs, then the layers so far, added in
        the same order as one call adds them); a resumed call runs the base and source runs again without
        counting them twice.
        """
        nodes = [self.unflatten(int(i)) for i in flat]
        parts = torch.tensor(
            [(self.node_types.index(t), index[0], *unit_and_pos(t, index)) for t, index in nodes], dtype=torch.long
        )  # [k, 4]: type index, layer, head/kv-head/neuron, position
        batch = batch_for_memory(check_batch_size(self.batch_size), 1.0, element_bytes(self.model, self.pairs.seq_len))
        effects = torch.zeros(len(flat), self.pairs.n_pairs, dtype=torch.float64)
        cache: list[PatchCache] = []
        running = Cost()  # the call's cost so far
        with progress_bar(len(flat) * self.pairs.n_pairs, "verify", self.progress) as bar:
            for layer in torch.unique(parts[:, 1]).tolist():
                rows = torch.nonzero(parts[:, 1] == layer)[:, 0]

                def run(rows: torch.Tensor = rows) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
                    cost = Cost(running.forward, running.backward)
                    if not cache:  # base and source runs: counted when the call starts, not again on a resume
                        cache.append(prepare(self.model, self.pairs, self.direction, self.node_types, cost))
                        if running.forward_equivalents > 0:
                            cost = Cost(running.forward, running.backward)
                    ranked = (parts[rows, 0], parts[rows, 1], parts[rows, 2], parts[rows, 3])
                    found = patch_ranked(self.model, cache[0], self.node_types, ranked, batch, cost, bar.update)
                    tensors = {"effects": found, "base_metric": cache[0].base_metric.detach().double().cpu()}
                    return {"cost": cost.to_dict()}, tensors

                facts, tensors = self.journal.step("verify", {**key, "layer": int(layer)}, run)
                if self.journal.last_replayed:
                    bar.update(len(rows) * self.pairs.n_pairs)
                running = Cost.from_dict(facts["cost"])
                self.base_metric = tensors["base_metric"]
                effects[rows] = tensors["effects"]
        self.add_cost(stage, running)
        return effects

    def _verify(self, flat: torch.Tensor) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        # A ranking that puts exactly these nodes first, in this order, so verify patches them and only them.
        key = torch.zeros(len(self.weight), dtype=torch.float64)
        key[flat] = torch.arange(len(flat), 0, -1, dtype=torch.float64)
        scores, start = {}, 0
        for t in self.node_types:
            size = math.prod(self.shapes[t])
            scores[t] = key[start : start + size].reshape(self.shapes[t])
            start += size
        ranking = Attribution(
            method="find-order",
            options={},
            direction=self.direction,
            metric=self.pairs.metric_name,
            model_id=self.model.model_id,
            per_pair={t: s[None] for t, s in scores.items()},
            scores=scores,
            aggregation="mean",
            cost=Cost(),
            info={} if self.edge_graph is None else {"edge_graph": self.edge_graph},
        )
        result = verify(
            self.model,
            self.pairs,
            ranking,
            budget=len(flat),
            batch_size=self.batch_size,
            progress=self.progress,
            **self.engine,
        )
        tensors = {"effects": result.effects.double(), "base_metric": result.base_metric.double()}
        return {"cost": result.cost.to_dict()}, tensors

    def bound(
        self, theta: float, samples: int, p: float, alpha: float, seed: int, memory_gb: float
    ) -> FalseNegativeBound:
        """Run (or replay) a false-negative bound over the unverified nodes."""
        key = {"samples": samples, "p": p, "alpha": alpha, "seed": seed, "verified": digest(self.verified)}

        def run() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
            result = false_negative_bound(
                self.model,
                self.pairs,
                self.verified_nodes(),
                theta=theta,
                samples=samples,
                p=p,
                alpha=alpha,
                seed=seed,
                direction=self.direction,
                nodes=self.node_types,
                batch_size=self.batch_size,
                memory_gb=memory_gb,
                progress=self.progress,
                **self.engine,
            )
            return bound_parts(result)

        facts, tensors = self.journal.step("bound", key, run)
        result = bound_from_parts(facts, tensors)
        self.add_cost("bound", result.cost)
        return result

    def verified_nodes(self) -> list[tuple[str, tuple[int, ...]]]:
        return [self.unflatten(i) for i in self.order]


def history_row(
    round_index: int,
    stage: str,
    n_verified: int,
    n_found: int,
    search: Search,
    bound: FalseNegativeBound | None,
    certified: bool = False,
    n_flagged: int = 0,
) -> dict[str, Any]:
    """One history row: what a round did and where the search stands after it."""
    return {
        "round": round_index,
        "stage": stage,
        "verified": n_verified,
        "found": n_found,
        "n_unverified": int((~search.verified).sum()),
        "samples": None if bound is None or stage != "bound" else bound.info.get("samples"),
        "p": None if bound is None or stage != "bound" else bound.info.get("p"),
        "alpha_round": None if bound is None or stage != "bound" else bound.alpha,
        "max_effect_upper": None if bound is None else bound.max_effect_upper,
        "n_flagged": n_flagged,
        "cost_fe": search.spent,
        "certified": certified,
    }


def exhaustive_bound(search: Search, theta: float, alpha: float) -> FalseNegativeBound:
    """The 'bound' when nothing is left unverified: exact, so no assumption and nothing can hide."""
    return FalseNegativeBound(
        max_effect_upper=0.0,
        prob_upper=0.0,
        theta=theta,
        alpha=alpha,
        n_unverified=0,
        worst_node=None,
        assumption=NO_ASSUMPTION,
        cost=Cost(),
        direction=search.direction,
        info={"samples": 0, "p": None},
    )


def localization(
    search: Search,
    estimate_method: str,
    bound: FalseNegativeBound | None,
    certified: bool,
    theta: float,
    alpha: float,
    history: list[dict[str, Any]],
    exhaustive: float,
    stopped: str,
    not_ruled_out: torch.Tensor,
    options: dict[str, Any],
) -> Localization:
    """The ``Localization`` of a finished (or stopped) search."""
    n_pairs = search.pairs.n_pairs
    effects = torch.stack(search.effects) if search.effects else torch.zeros(0, n_pairs, dtype=torch.float64)
    mean = effects.mean(1)  # [N verified]
    threshold = theta * (1 - THETA_TOLERANCE)
    strong = torch.nonzero(mean.abs() >= threshold)[:, 0]
    strong = strong[torch.sort(mean[strong].abs(), descending=True, stable=True).indices]
    verified_nodes = search.verified_nodes()
    graph = {} if search.edge_graph is None else {"edge_graph": search.edge_graph}
    verification = Verification(
        nodes=verified_nodes,
        effects=effects,
        estimate_scores=search.estimate_score[torch.tensor(search.order, dtype=torch.long)]
        if search.order
        else torch.zeros(0, dtype=torch.float64),
        node_types=list(search.node_types),
        direction=search.direction,
        metric=search.pairs.metric_name,
        model_id=search.model.model_id,
        cost=search.cost.get("verify_estimate_order", Cost())
        + search.cost.get("verify_bound_order", Cost())
        + search.cost.get("verify_rest", Cost()),
        base_metric=search.base_metric if search.base_metric is not None else torch.zeros(n_pairs),
        info={
            "estimate_method": estimate_method,
            "stage": list(search.stage_of),
            "n_nodes": len(search.weight),
            **graph,
        },
    )
    left = {
        "n_unverified": int((~search.verified).sum()),
        "n_not_ruled_out": int((not_ruled_out & ~search.verified).sum()),
        "max_effect_upper": None if bound is None else float(bound.max_effect_upper),
        "budget_left": None if search.budget is None else max(0.0, search.left),
    }
    return Localization(
        nodes=[verified_nodes[i] for i in strong.tolist()],
        effects=mean[strong].clone(),
        verified=verification,
        bound=bound,
        certified=certified,
        theta=float(theta),
        alpha=float(alpha),
        cost={stage: search.cost[stage] for stage in STAGES if stage in search.cost},
        history=history,
        exhaustive_cost=exhaustive,
        node_types=list(search.node_types),
        estimator=estimate_method,
        direction=search.direction,
        metric=search.pairs.metric_name,
        model_id=search.model.model_id,
        info={"stopped": "certified" if certified else stopped, "left": left, **options, **graph},
    )
