"""The state of one ``atpstar.find`` call: its population, what was verified, costs, and the result.

Every expensive step (the estimate, each verification call, each bound) goes through the call's
``FindJournal`` (``find.journal``), so an interrupted call resumes without redoing completed steps.
Nodes of every type lie on one flat axis (``check_node_types`` order); edges are one type with the
layout [N edges] (``atpstar.edges``).

Shape letters: P pairs, N nodes (all node types, flattened), K nodes of one step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..bound import FalseNegativeBound, false_negative_bound
from ..cost import Cost
from ..engine import PatchCache, element_bytes, prepare
from ..engine import patch_listed as patch_ranked
from ..model import Model
from ..nodes import EDGE_TYPE, node_shape, unit_and_pos
from ..pairs import PromptPairs
from ..progress import progress_bar
from ..validate import batch_for_memory, check_batch_size
from .journal import FindJournal, Step, digest
from .options import FindOptions

# |c| within this fraction of θ counts as >= θ: float32 patching differs by ~1e-7 between batchings.
THETA_TOLERANCE = 1e-5
NO_ASSUMPTION = "None: every node was verified by exact activation patching."
Node = tuple[str, tuple[int, ...]]  # (node type, index in its layout)


def population(model: Model, node_types: list[str], seq_len: int) -> tuple[dict[str, tuple[int, ...]], torch.Tensor]:
    """(layout per node type, [N] forward cost of patching each node on one pair).

    A node at layer l costs (L - l) / L of a forward (the patched run starts at its layer). An edge into
    a q/k/v receiver at layer l costs the same plus 1/L for its receiver's own copy of the layer input;
    an edge into the logits costs no forward (``edges.patching``).
    """
    if node_types == [EDGE_TYPE]:
        from ..edges.graph import graph_of

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


# Exact patching of a given list of nodes: the one place find patches nodes. ---------------------------------
# TODO(lead): use verify.patch_nodes (and the node space's exact_effects) instead of this adapter.


def patch_nodes(
    model: Model,
    cache: PatchCache,
    node_types: list[str],
    nodes: list[Node],
    batch: int,
    cost: Cost,
    advance: Any = None,
) -> torch.Tensor:
    """Exact effects [k, P] float64 of the listed nodes on every pair of ``cache`` (``verify.patch_ranked``)."""
    return patch_ranked(model, cache, node_types, _ranked(node_types, nodes), batch, cost, advance)


def exact_effects(search: Search, nodes: list[Node], cost: Cost) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact effects [k, P] of the listed nodes and the base metric [P] in one call: edges by exact edge
    patching, nodes as the work units of ``atpstar.verify`` (on the search's Ray workers)."""
    model, pairs = search.model, search.pairs
    if search.edge_graph is not None:
        from ..edges.verify import edge_effects

        options = search.options
        edges = torch.tensor([index[0] for _, index in nodes], dtype=torch.long)  # [k]
        return edge_effects(model, pairs, options.direction, edges, None, options.batch_size, options.progress, cost)
    from ..distributed import executor_for
    from ..distributed.sweeps import verify_on

    executor = executor_for(model, search.options.workers, search.options.ray_address, search.options.progress)
    ranked = _ranked(search.node_types, nodes)
    effects, base_metric, _ = verify_on(
        executor, model, pairs, search.node_types, search.options.direction, ranked, search._batch(), None, cost
    )
    return effects, base_metric.detach().double().cpu()


def _ranked(node_types: list[str], nodes: list[Node]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The engine's node tuple of ``nodes``: (type index, layer, head/kv-head/neuron, position), each [k]."""
    parts = torch.tensor(
        [(node_types.index(t), index[0], *unit_and_pos(t, index)) for t, index in nodes], dtype=torch.long
    ).reshape(len(nodes), 4)  # [k, 4]
    type_index, layer, unit, pos = parts.unbind(1)  # [k, 4] -> 4 x [k]
    return type_index, layer, unit, pos


@dataclass
class Search:
    """Mutable state of one ``find`` call: the population, what was verified, costs and history."""

    model: Model
    pairs: PromptPairs
    node_types: list[str]
    shapes: dict[str, tuple[int, ...]]
    weight: torch.Tensor  # [N] forward cost (L - l) / L of patching each node on one pair
    options: FindOptions  # direction, budget, batching and where verification and the bounds run
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
            from ..edges.graph import graph_of

            self.edge_graph = graph_of(self.model).describe()

    @property
    def spent(self) -> float:
        return sum(c.forward_equivalents for c in self.cost.values())

    @property
    def left(self) -> float:
        return math.inf if self.options.budget is None else self.options.budget - self.spent

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
        if self.options.budget is None or len(flat) == 0:
            return len(flat)
        return int((self.verify_cost(flat) <= self.left + 1e-9).sum())

    def sample_cost(self, p: float) -> float:
        """Forward equivalents of one joint patch of the bound at inclusion probability ``p``: 1 for nodes; for
        edges, also the q/k/v receiver copies a patch needs (``edges.subsampling.joint_patch_cost``)."""
        if self.edge_graph is None:
            return 1.0
        from ..edges.subsampling import joint_patch_cost

        return joint_patch_cost(self.model, ~self.verified, p)

    def estimate(self, estimator: str, options: dict[str, Any], compute: Any) -> tuple[torch.Tensor, str]:
        """Run (or replay) the estimator: ([P, N] per-pair scores, method id); sets ``estimate_score``."""

        def run() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
            result = compute()
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
        nodes = [self.unflatten(int(i)) for i in flat]
        if self.edge_graph is None and all(v is None for v in self.options.engine.values()):
            effects = self._verify_by_layer(nodes, stage, key)
        else:  # edges, or Ray workers: one call, one journal step
            facts, tensors = self.journal.step("verify", key, lambda: self._verify_at_once(nodes))
            self.add_cost(stage, Cost.from_dict(facts["cost"]))
            self.base_metric = tensors["base_metric"]
            effects = tensors["effects"]  # [k, P], rows in the order of flat
        self.verified[flat] = True
        self.order.extend(int(i) for i in flat)
        self.effects.extend(effects)
        self.stage_of.extend([stage] * len(flat))
        return effects

    def _verify_by_layer(self, nodes: list[Node], stage: str, key: dict[str, Any]) -> torch.Tensor:
        """In-process verification of ``nodes`` as one journal step per layer: [k, P] effects.

        The same forwards as one ``atpstar.verify`` call (it too patches layer by layer, each layer's nodes in
        rank order, in the same batches), so the numbers are the same; a kill loses at most one layer's work.
        Each step records the call's running cost (base and source runs, then the layers so far, added in
        the same order as one call adds them); a resumed call runs the base and source runs again without
        counting them twice.
        """
        layer_of = torch.tensor([index[0] for _, index in nodes], dtype=torch.long)  # [k]
        effects = torch.zeros(len(nodes), self.pairs.n_pairs, dtype=torch.float64)
        cache: list[PatchCache] = []
        running = Cost()  # the call's cost so far
        with progress_bar(len(nodes) * self.pairs.n_pairs, "verify", self.options.progress) as bar:
            for layer in torch.unique(layer_of).tolist():
                rows = torch.nonzero(layer_of == layer)[:, 0]

                def run(rows: torch.Tensor = rows) -> Step:
                    cost = Cost(running.forward, running.backward)
                    if not cache:  # base and source runs: counted when the call starts, not again on a resume
                        cache.append(prepare(self.model, self.pairs, self.options.direction, self.node_types, cost))
                        if running.forward_equivalents > 0:
                            cost = Cost(running.forward, running.backward)
                    chosen = [nodes[i] for i in rows.tolist()]
                    found = patch_nodes(self.model, cache[0], self.node_types, chosen, self._batch(), cost, bar.update)
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

    def _verify_at_once(self, nodes: list[Node]) -> Step:
        """Edges, or nodes on Ray workers: every node of one verification in one call."""
        cost = Cost()
        effects, base_metric = exact_effects(self, nodes, cost)
        return {"cost": cost.to_dict()}, {"effects": effects.double(), "base_metric": base_metric.double()}

    def _batch(self) -> int:
        """Patched forwards per batch of verification (1 GiB when ``batch_size`` is None, as ``atpstar.verify``)."""
        item_bytes = element_bytes(self.model, self.pairs.seq_len)
        return batch_for_memory(check_batch_size(self.options.batch_size), 1.0, item_bytes)

    def bound(self, samples: int, p: float, alpha: float, seed: int) -> FalseNegativeBound:
        """Run (or replay) a false-negative bound over the unverified nodes (at ``theta``, batched as the options say)."""
        key = {"samples": samples, "p": p, "alpha": alpha, "seed": seed, "verified": digest(self.verified)}

        def run() -> Step:
            result = false_negative_bound(
                self.model,
                self.pairs,
                self.verified_nodes(),
                theta=self.options.theta,
                samples=samples,
                p=p,
                alpha=alpha,
                seed=seed,
                direction=self.options.direction,
                nodes=self.node_types,
                batch_size=self.options.batch_size,
                memory_gb=self.options.memory_gb,
                progress=self.options.progress,
                **self.options.engine,
            )
            return result.to_parts()

        facts, tensors = self.journal.step("bound", key, run)
        result = FalseNegativeBound.from_parts(facts, tensors)
        self.add_cost("bound", result.cost)
        return result

    def verified_nodes(self) -> list[Node]:
        return [self.unflatten(i) for i in self.order]
