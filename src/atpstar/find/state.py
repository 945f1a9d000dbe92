"""The state of one ``atpstar.find`` call: its population, what was verified, and the costs per stage.

Every expensive step (the estimate, each verification call, each bound) goes through the call's
``FindJournal`` (``find.journal``), so an interrupted call resumes without redoing completed steps.
Nodes of every type lie on one flat axis (``check_node_types`` order, each type in its space's layout).

Shape letters: P pairs, N nodes (all node types, flattened), K nodes of one step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..bound import FalseNegativeBound, false_negative_bound
from ..cost import Cost
from ..engine import PatchCache, prepare
from ..engine import patch_listed as patch_ranked
from ..job import Job
from ..model import Model
from ..nodes import NodeLayout
from ..progress import progress_bar
from ..spaces import Spaces
from ..verify import patch_nodes, plan_pair_blocks
from .engines import EngineFacts
from .journal import FindJournal, Step, digest
from .options import FindOptions

# |c| within this fraction of θ counts as >= θ: float32 patching differs by ~1e-7 between batchings.
THETA_TOLERANCE = 1e-5
NO_ASSUMPTION = "None: every node was verified by exact activation patching."
Node = tuple[str, tuple[int, ...]]  # (node type, index in its layout)


def population(
    model: Model, spaces: Spaces, node_types: list[str], seq_len: int, facts: EngineFacts
) -> tuple[dict[str, tuple[int, ...]], torch.Tensor]:
    """(layout per node type, [N] forward cost of patching each node on one pair, as the exact sweep counts it)."""
    shapes = {t: spaces.of(t).shape(t, seq_len) for t in node_types}
    costs = [facts.patch_cost(model, spaces.of(t), t, seq_len).flatten() for t in node_types]  # [*layout] -> [n]
    return shapes, torch.cat(costs)  # [N]


@dataclass
class Search:
    """Mutable state of one ``find`` call: the population, what was verified, costs and history."""

    job: Job  # model, pairs, direction and progress of the call (costs are kept per stage in ``cost``)
    node_types: list[str]
    shapes: dict[str, tuple[int, ...]]
    weight: torch.Tensor  # [N] forward cost (L - l) / L of patching each node on one pair
    options: FindOptions  # direction, budget, batching and where verification and the bounds run
    journal: FindJournal
    spaces: Spaces  # the node spaces searched, bound to the model
    facts: EngineFacts  # what their engine's steps cost (``find.engines``)
    layout: NodeLayout = field(init=False)
    estimate_score: torch.Tensor = field(init=False)  # [N] the estimator's aggregate score per node
    verified: torch.Tensor = field(init=False)  # [N] bool
    order: list[int] = field(default_factory=list)  # flat index of each verified node, in order
    effects: list[torch.Tensor] = field(default_factory=list)  # per verified node: [P]
    stage_of: list[str] = field(default_factory=list)
    base_metric: torch.Tensor | None = None
    cost: dict[str, Cost] = field(default_factory=dict)
    # Never spend past this (forward equivalents): the estimate plus (1 + max_overspend) x exhaustive patching,
    # set once the estimate ran (``find.loop``). Every step that verification of the rest does not need (a bound,
    # the base and source runs of another verification call) is taken only while the rest still fits after it.
    ceiling: float = math.inf

    def __post_init__(self) -> None:
        self.layout = NodeLayout(self.shapes)  # the flat node axis: node types end to end
        self.verified = torch.zeros(len(self.weight), dtype=torch.bool)
        self.estimate_score = torch.zeros(len(self.weight), dtype=torch.float64)

    @property
    def spent(self) -> float:
        return sum(c.forward_equivalents for c in self.cost.values())

    @property
    def limit(self) -> float:
        """What the search may spend in all: ``budget``, and never more than ``ceiling``."""
        return min(self.options.limit, self.ceiling)

    @property
    def left(self) -> float:
        return self.limit - self.spent

    @property
    def budget_left(self) -> float:
        """What the user's ``budget`` leaves (inf without one)."""
        return self.options.limit - self.spent

    @property
    def rest_cost(self) -> float:
        """Forward equivalents of verifying every unverified node in one call (0 when none is left)."""
        unverified = torch.nonzero(~self.verified)[:, 0]
        return float(self.verify_cost(unverified)[-1]) if len(unverified) else 0.0

    @property
    def slack(self) -> float:
        """What a gamble may cost: the ceiling less what is spent and what verifying the rest would cost.

        A step the exhaustive finish does not need (a bound, or the 2P base and source runs of one more
        verification call) is taken only when it costs at most this; then, whatever it finds, verifying every
        node left still fits the ceiling, so the search can always end certified (by exhaustion).
        """
        return self.ceiling - self.spent - self.rest_cost

    def may_call(self) -> bool:
        """Whether one more verification call (2P forwards of base and source runs beyond the nodes) fits the slack."""
        return self.slack >= 2.0 * self.job.n_pairs - 1e-9

    def limit_reason(self, where: str) -> str:
        """Why the search stopped at the user's budget (``where``: what it was doing)."""
        return f"budget={self.options.limit:g} spent {where}"

    def add_cost(self, stage: str, cost: Cost) -> None:
        self.cost[stage] = self.cost.get(stage, Cost()) + cost

    def unflatten(self, flat: int) -> Node:
        """(node type, layout index) of one position of the flat node axis."""
        return self.layout.locate(flat)

    def verify_cost(self, flat: torch.Tensor) -> torch.Tensor:
        """[k] forward equivalents of verifying the first 1..k nodes of ``flat`` in one call."""
        return self.job.n_pairs * (2.0 + self.weight[flat].cumsum(0))

    def affordable(self, flat: torch.Tensor, ceiling: bool = True) -> int:
        """How many of ``flat`` (in order) one verify call can patch within the budget and (unless ``ceiling`` is
        False: the exhaustive finish, which the slack always leaves room for) the ceiling."""
        left = self.left if ceiling else self.budget_left
        if math.isinf(left) or len(flat) == 0:
            return len(flat)
        return int((self.verify_cost(flat) <= left + 1e-9).sum())

    def sample_cost(self, p: float) -> float:
        """Forward equivalents of one joint patch of the bound at inclusion probability ``p`` (1 for site nodes;
        edges add the q/k/v receiver copies a patch needs)."""
        return self.facts.joint_patch_cost(self.job.model, ~self.verified, p)

    def estimate(self, estimator: str, options: dict[str, Any], compute: Any) -> tuple[torch.Tensor, str]:
        """Run (or replay) the estimator: ([P, N] per-pair scores, method id); sets ``estimate_score``."""

        def run() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
            result = compute()
            tensors = {
                "scores": self.layout.flatten({t: result.scores[t].double() for t in self.node_types}),  # [N]
                "per_pair": self.layout.flatten({t: result.per_pair[t].double() for t in self.node_types}),  # [P, N]
            }
            return {"method": result.method, "cost": result.cost.to_dict()}, tensors

        facts, tensors = self.journal.step("estimate", {"method": estimator, "options": options}, run)
        self.use_estimate(tensors["scores"], Cost.from_dict(facts["cost"]))
        return tensors["per_pair"], str(facts["method"])

    def use_estimate(self, scores: torch.Tensor, cost: Cost) -> None:
        self.estimate_score = scores
        self.add_cost("estimate", cost)

    def verify(self, flat: torch.Tensor, stage: str) -> torch.Tensor:
        """Patch the nodes ``flat`` exactly (as ``atpstar.verify``): [k, P] effects."""
        if len(flat) == 0:
            return torch.zeros(0, self.job.n_pairs, dtype=torch.float64)
        key = {"stage": stage, "n": len(flat), "nodes": digest(flat.long())}
        nodes = [self.unflatten(int(i)) for i in flat]
        layered = self._by_layer()
        if layered is not None:
            effects = self._verify_by_layer(layered, nodes, stage, key)
        else:  # nodes that cannot be patched layer by layer here, or Ray workers: one call, one journal step
            facts, tensors = self.journal.step("verify", key, lambda: self._verify_at_once(nodes))
            self.add_cost(stage, Cost.from_dict(facts["cost"]))
            self.base_metric = tensors["base_metric"]
            effects = tensors["effects"]  # [k, P], rows in the order of flat
        self.verified[flat] = True
        self.order.extend(int(i) for i in flat)
        self.effects.extend(effects)
        self.stage_of.extend([stage] * len(flat))
        return effects

    def _by_layer(self) -> Any:
        """The one in-process space whose nodes the engine patches layer by layer (``ranked_index``), or None."""
        if any(v is not None for v in self.options.engine.values()) or len(self.spaces.spaces) != 1:
            return None
        space = self.spaces.spaces[0]
        return space if hasattr(space, "ranked_index") else None

    def _verify_by_layer(self, space: Any, nodes: list[Node], stage: str, key: dict[str, Any]) -> torch.Tensor:
        """In-process verification of ``nodes`` as one journal step per layer (and block of pairs): [k, P] effects.

        The same forwards as one ``atpstar.verify`` call (``NodeSpace.exact_effects`` too patches layer by layer,
        each layer's nodes in rank order, in the same batches), so the numbers are the same; a kill loses at most
        one layer's work. The base and source runs are shared by the layers (one ``exact_effects`` call per layer
        would repeat them); pairs whose runs do not fit half of ``memory_gb`` are verified in blocks, as ``verify``
        does. Each step records the call's running cost (a block's base and source runs, then its layers, added
        in the same order as one call adds them); a resumed block runs its base and source runs again without
        counting them twice.
        """
        job, options = self.job, self.options
        ranked = space.ranked_index(nodes)  # (type, layer, unit, pos), each [k]
        block, batch = plan_pair_blocks(job, space, options.batch_size, options.memory_gb, "find: verify")
        effects = torch.zeros(len(nodes), job.n_pairs, dtype=torch.float64)
        base_metric = torch.zeros(job.n_pairs, dtype=torch.float64)
        running = Cost()  # the call's cost so far
        with progress_bar(len(nodes) * job.n_pairs, "verify", job.progress) as bar:
            for start in range(0, job.n_pairs, block):
                pairs = slice(start, min(start + block, job.n_pairs))
                part = job if block == job.n_pairs else job.with_pairs(job.pairs.subset(range(pairs.start, pairs.stop)))
                where = {} if block == job.n_pairs else {"pairs": [pairs.start, pairs.stop]}
                running, base_metric[pairs] = self._verify_block(
                    space, ranked, part, batch, {**key, **where}, running, effects, bar
                )
        self.base_metric = base_metric
        self.add_cost(stage, running)
        return effects

    def _verify_block(
        self, space: Any, ranked: Any, part: Job, batch: int, key: dict[str, Any], running: Cost,
        effects: torch.Tensor, bar: Any,
    ) -> tuple[Cost, torch.Tensor]:  # fmt: skip
        """One block of pairs (``part``) of ``_verify_by_layer``: fills its columns of ``effects`` [k, P];
        returns the call's running cost and the block's base metric [b]."""
        types, counted = list(space.node_types), False
        cache: list[PatchCache] = []
        base_metric = torch.zeros(part.n_pairs, dtype=torch.float64)
        columns = slice(key["pairs"][0], key["pairs"][1]) if "pairs" in key else slice(None)
        for layer in torch.unique(ranked[1]).tolist():
            rows = torch.nonzero(ranked[1] == layer)[:, 0]

            def run(rows: torch.Tensor = rows, counted: bool = counted) -> Step:
                cost = Cost(running.forward, running.backward)
                if not cache:  # base and source runs: counted when the block starts, not again on a resume
                    fresh = Cost()
                    cache.append(prepare(part.model, part.pairs, part.direction, types, fresh, chunk=batch))
                    cost = cost if counted else cost + fresh
                listed = (ranked[0][rows], ranked[1][rows], ranked[2][rows], ranked[3][rows])
                found = patch_ranked(part.model, cache[0], types, listed, batch, cost, bar.update)
                tensors = {"effects": found, "base_metric": cache[0].base_metric.detach().double().cpu()}
                return {"cost": cost.to_dict()}, tensors

            facts, tensors = self.journal.step("verify", {**key, "layer": int(layer)}, run)
            counted = True  # the block's base and source runs are in the running cost from its first step on
            if self.journal.last_replayed:
                bar.update(len(rows) * part.n_pairs)
            running = Cost.from_dict(facts["cost"])
            base_metric = tensors["base_metric"]
            effects[rows, columns] = tensors["effects"]
        return running, base_metric

    def _verify_at_once(self, nodes: list[Node]) -> Step:
        """Every node of one verification in one ``verify.patch_nodes`` call (each space patches its own)."""
        job, options = self.job.with_cost(Cost()), self.options
        effects, base_metric, _ = patch_nodes(
            job, self.spaces, nodes, options.batch_size, options.memory_gb, **options.engine
        )
        return {"cost": job.cost.to_dict()}, {
            "effects": effects.double(),
            "base_metric": base_metric.detach().double().cpu(),
        }

    def bound(self, samples: int, p: float, alpha: float, seed: int) -> FalseNegativeBound:
        """Run (or replay) a false-negative bound over the unverified nodes (at ``theta``, batched as asked)."""
        key = {"samples": samples, "p": p, "alpha": alpha, "seed": seed, "verified": digest(self.verified)}

        def run() -> Step:
            result = false_negative_bound(
                self.job.model,
                self.job.pairs,
                self.verified_nodes(),
                theta=self.options.theta,
                samples=samples,
                p=p,
                alpha=alpha,
                seed=seed,
                direction=self.job.direction,
                nodes=self.node_types,
                batch_size=self.options.batch_size,
                memory_gb=self.options.memory_gb,
                progress=self.job.progress,
                **self.options.engine,
            )
            return result.to_parts()

        facts, tensors = self.journal.step("bound", key, run)
        result = FalseNegativeBound.from_parts(facts, tensors)
        self.add_cost("bound", result.cost)
        return result

    def verified_nodes(self) -> list[Node]:
        return [self.unflatten(i) for i in self.order]
