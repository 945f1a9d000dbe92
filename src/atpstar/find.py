"""Certified localization: ``find`` closes the loop from an estimate to a guarantee.

Goal: every node with |c(n)| >= θ (c = exact mean effect over the pairs), verified by exact patching,
and a certificate that no unverified node is that large. The loop:

1. Estimate: one estimator (AtP* by default) ranks every node.
2. Verify in estimate order, in windows of ``patience`` nodes. Stopping rule: stop after the first
   window that found no node with |c| >= θ AND did not pay for itself. A verified node leaves the
   bound's population, and the bound's cost is linear in V = mean_j Σ c_j(n)² over the unverified
   nodes (``bound.bound_cost``: SAFETY q² V / θ²), so verifying n saves SAFETY q² mean_j c_j(n)² / θ²
   forward equivalents of bound samples; a window pays when its savings exceed its verification
   cost. (Verifying any node above roughly θ·sqrt(P (L-l)/L / (SAFETY q²)), about θ/10 on one pair,
   pays; AtP*'s order is good at the top and unreliable in its tail, so windows stop paying.)
3. Bound round r: Subsampling over the unverified nodes (fresh seed), at level α_r = α / 2^r, with
   ``samples`` planned from the nodes left and p = ``choose_p(samples)`` (``atpstar.bound``).
   Certified when the bound's max_n U(n) < θ.
4. Otherwise verify the nodes the bound cannot rule out (U(n) >= θ), in decreasing order of that
   bound's own |ĉ(n)|, and go to 3 with samples re-planned from the measured standard errors.
Stops when certified, when the budget is spent, or after ``max_rounds`` rounds (not certified; the
result says what is left). Whenever verifying every remaining node costs no more than the next bound,
they are all verified instead: exact, and certified with no assumption.

Why α / 2^r: each round is a new chance to certify wrongly. Given the history, round r certifies
while some unverified node n0 has |c(n0)| >= θ with probability <= α_r (its fresh samples put
U(n0) < θ with at most that probability), so over all rounds the error is <= Σ α / 2^r < α.
The guarantee is about Subsampling's quantity, which equals c(n) when effects are near-additive.

Cost: the estimator's, plus (per verify call) 2P forwards and one forward per node and pair started
at the node's layer, plus per bound 2P + samples × P forwards. ``budget`` caps the total in forward
equivalents; every stage checks it before it runs.

Shape letters: P pairs, N nodes (all node types, flattened in ``check_node_types`` order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .api import attribute
from .bound import MIN_SAMPLES, FalseNegativeBound, bound_cost, choose_p, false_negative_bound, plan_samples
from .cost import Cost
from .errors import InputError
from .localization import STAGES, Localization
from .methods import METHODS
from .model import Model, as_model
from .nodes import check_node_types, node_shape
from .pairs import PromptPairs, check_direction
from .result import Attribution
from .verify import Verification, verify

# |c| within this fraction of θ counts as >= θ: float32 patching differs by ~1e-7 between batchings.
THETA_TOLERANCE = 1e-5
NO_ASSUMPTION = "None: every node was verified by exact activation patching."


@dataclass
class _Search:
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
    estimate_score: torch.Tensor  # [N] the estimator's aggregate score per node
    engine: dict[str, Any]  # workers / ray_address for verify and the bounds
    verified: torch.Tensor = field(init=False)  # [N] bool
    order: list[int] = field(default_factory=list)  # flat index of each verified node, in order
    effects: list[torch.Tensor] = field(default_factory=list)  # per verified node: [P]
    stage_of: list[str] = field(default_factory=list)
    base_metric: torch.Tensor | None = None
    cost: dict[str, Cost] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.verified = torch.zeros(len(self.weight), dtype=torch.bool)

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

    def verify(self, flat: torch.Tensor, stage: str) -> torch.Tensor:
        """Patch the nodes ``flat`` exactly (the batched engine, through ``atpstar.verify``): [k, P] effects."""
        if len(flat) == 0:
            return torch.zeros(0, self.pairs.n_pairs, dtype=torch.float64)
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
        self.add_cost(stage, result.cost)
        self.base_metric = result.base_metric
        effects = result.effects.double()  # [k, P], rows in the order of flat
        self.verified[flat] = True
        self.order.extend(int(i) for i in flat)
        self.effects.extend(effects)
        self.stage_of.extend([stage] * len(flat))
        return effects

    def verified_nodes(self) -> list[tuple[str, tuple[int, ...]]]:
        return [self.unflatten(i) for i in self.order]


def find(
    model: Any,
    pairs: PromptPairs,
    theta: float,
    *,
    nodes: Any,
    estimator: str | Attribution = "atp*",
    alpha: float = 0.05,
    budget: float | None = None,
    direction: str = "noising",
    progress: bool = False,
    patience: int | None = None,
    max_rounds: int = 6,
    seed: int = 0,
    estimator_options: dict[str, Any] | None = None,
    batch_size: int | None = None,
    memory_gb: float = 1.0,
    workers: int | None = None,
    ray_address: str | None = None,
) -> Localization:
    """Find every node with |c(n)| >= ``theta`` and certify that no other node is that large.

    Args:
        model: an ``atpstar.Model`` or a ``transformers`` causal LM.
        pairs: the prompt pairs; c(n) is the exact effect of patching n alone, averaged over them.
        theta: the effect size sought (in metric units, e.g. logit difference), > 0.
        nodes: node types to search (``neuron``, ``query``, ``key``, ``value``, ``head``).
        estimator: a method id from ``atpstar.METHODS`` (default ``"atp*"``), or an ``Attribution``
            already computed on these pairs (its cost is counted as the estimate stage).
        alpha: error rate of the certificate (it is wrong with probability <= alpha, under its assumption).
        budget: cap on the total cost in forward-pass equivalents (backward = 2 forwards), estimate
            included; None: run until certified (at worst every node is verified).
        direction: ``"noising"`` (default) or ``"denoising"``.
        progress: progress bars and one line per round on stderr.
        patience: window of the estimate-order stage (stops after a window with no |c| >= theta);
            None: max(16, N / 200) for N nodes.
        max_rounds: bound rounds at most.
        seed: seed of the bounds' Subsampling (round r uses seed + r).
        estimator_options: options of the estimator method.
        batch_size, memory_gb: batching of the exact and joint patches.
        workers, ray_address: run verification and the bounds' Subsampling on Ray workers (as
            ``atpstar.verify`` and ``atpstar.false_negative_bound``); None: in-process.

    Returns:
        ``Localization``: ``nodes``, ``effects``, ``verified``, ``bound``, ``certified``, ``cost`` per stage,
        ``history``, ``certificate()``, ``save``/``load``.

    Raises:
        InputError: bad theta, alpha, budget, node types, estimator or options (before any forward pass).

    Example:
        >>> found = atpstar.find(model, pairs, 0.3, nodes=["query", "key", "value", "head"])
        >>> found.certified, found.names[:5], found.cost_fraction
    """
    model = as_model(model)
    if not isinstance(pairs, PromptPairs):
        raise InputError(f"pairs must be an atpstar.PromptPairs; got {type(pairs).__name__}")
    _check_number("theta", theta, "a positive number (the effect size sought, in metric units)")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 < alpha < 1.0:
        raise InputError(f"alpha must lie strictly between 0 and 1; got {alpha!r}")
    if budget is not None:
        _check_number("budget", budget, "a positive number of forward-pass equivalents, or None (no limit)")
    for name, value in (("patience", patience), ("max_rounds", max_rounds)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InputError(f"{name} must be an integer >= 1; got {value!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InputError(f"seed must be an integer; got {seed!r}")
    node_types = check_node_types(nodes)
    direction = check_direction(direction)
    estimate = _estimate_or_check(model, pairs, estimator, node_types, direction, estimator_options)
    model.check_ready(torch.cat([pairs.clean, pairs.noise]))

    shapes = {t: node_shape(t, model.sizes, pairs.seq_len) for t in node_types}
    layers = torch.cat(
        [
            torch.arange(shapes[t][0]).repeat_interleave(math.prod(shapes[t][1:]))  # layer is axis 0 of every layout
            for t in node_types
        ]
    )
    weight = (model.n_layers - layers).double() / model.n_layers  # [N]
    n_pairs = pairs.n_pairs
    exhaustive = n_pairs * (2.0 + float(weight.sum()))
    say = _say if progress else (lambda message: None)

    if isinstance(estimate, Attribution):
        estimate_result = estimate
    else:
        estimate_result = attribute(
            model,
            pairs,
            str(estimator),
            node_types,
            direction=direction,
            progress=progress,
            **(estimator_options or {}),
        )
    scores = torch.cat([estimate_result.scores[t].double().flatten() for t in node_types])  # [N]
    per_pair = torch.cat([estimate_result.per_pair[t].double().flatten(1) for t in node_types], 1)  # [P, N]
    engine: dict[str, Any] = {"workers": workers, "ray_address": ray_address}
    search = _Search(model, pairs, node_types, shapes, weight, direction, budget, progress, batch_size, scores, engine)
    search.add_cost("estimate", estimate_result.cost)
    history: list[dict[str, Any]] = []
    n_nodes = len(weight)
    window = patience or max(16, math.ceil(n_nodes / 200))
    threshold = theta * (1 - THETA_TOLERANCE)
    stopped, bound, not_ruled_out = "", None, torch.zeros(n_nodes, dtype=torch.bool)

    # Stage 1: verify in estimate order while the windows keep finding nodes >= theta.
    order = torch.sort(scores.abs(), descending=True, stable=True).indices
    position, found_here = 0, 0
    while position < n_nodes and not stopped:
        chunk = order[position : position + window]
        fit = search.affordable(chunk)
        if fit < len(chunk):
            stopped = "budget spent while verifying in estimate order"
            chunk = chunk[:fit]
        window_cost = float(search.verify_cost(chunk)[-1]) if len(chunk) else 0.0
        effects = search.verify(chunk, "verify_estimate_order")
        position += len(chunk)
        hits = int((effects.mean(1).abs() >= threshold).sum())
        found_here += hits
        saved = bound_cost(int((~search.verified).sum()), theta, alpha / 2, float((effects**2).mean(1).sum()))
        if hits == 0 and saved < window_cost:
            break
    history.append(_row(0, "verify_estimate_order", position, found_here, search, None))
    say(f"estimate order: verified {position} nodes, {found_here} with |c| >= {theta:g}")

    certified = False
    if search.spent > (budget if budget is not None else math.inf):
        stopped = "budget spent by the estimate"
    sum_sq = float((per_pair[:, ~search.verified] ** 2).sum(1).mean())  # V: mean over pairs of Σ c_j(n)²
    for round_index in range(1, max_rounds + 1):
        if stopped:
            break
        unverified = torch.nonzero(~search.verified)[:, 0]
        alpha_round = alpha / 2**round_index
        samples = plan_samples(len(unverified), n_pairs, theta, alpha_round, sum_sq)
        rest_cost = float(search.verify_cost(unverified)[-1]) if len(unverified) else 0.0
        if rest_cost <= n_pairs * (samples + 2):
            # Exact is cheaper than a bound: verify everything left (certified without assumption).
            fit = search.affordable(unverified)
            effects = search.verify(unverified[:fit], "verify_rest")
            hits = int((effects.mean(1).abs() >= threshold).sum())
            if fit < len(unverified):
                stopped = "budget spent while verifying the remaining nodes"
            else:
                certified = True
                bound = _exhaustive_bound(search, theta, alpha)
            history.append(_row(round_index, "verify_rest", fit, hits, search, bound, certified=certified))
            say(f"round {round_index}: verified the {fit} remaining nodes exactly")
            break
        affordable = samples if budget is None else math.floor(search.left / n_pairs) - 2
        if affordable < MIN_SAMPLES:
            stopped = f"budget spent: a bound needs {n_pairs * (MIN_SAMPLES + 2)} forward equivalents"
            break
        samples = min(samples, affordable)
        bound = false_negative_bound(
            model,
            pairs,
            search.verified_nodes(),
            theta=theta,
            samples=samples,
            p=choose_p(samples),
            alpha=alpha_round,
            seed=seed + round_index,
            direction=direction,
            nodes=node_types,
            batch_size=batch_size,
            memory_gb=memory_gb,
            progress=progress,
            **engine,
        )
        search.add_cost("bound", bound.cost)
        upper = torch.cat([bound.upper[t].flatten() for t in node_types])  # [N], nan at verified nodes
        bound_estimate = torch.cat([bound.estimate[t].flatten() for t in node_types])
        flagged = torch.nonzero((upper >= theta) & ~search.verified)[:, 0]  # inf (too few samples) counts
        not_ruled_out = torch.zeros(n_nodes, dtype=torch.bool)
        not_ruled_out[flagged] = True
        if bound.max_effect_upper < theta:
            certified = True
            history.append(_row(round_index, "bound", 0, 0, search, bound, certified=True))
            say(
                f"round {round_index}: certified, max |c| of {bound.n_unverified} unverified <= {bound.max_effect_upper:.3g}"
            )
            break
        # Verify what the bound cannot rule out, its largest estimates first; when noise flags many
        # nodes, spend at most what the next bound would cost and let that bound (more samples) sort them.
        measured = bound.info.get("se_median", float("nan"))
        if math.isfinite(measured) and measured > 0:
            sum_sq = measured**2 * bound.info["samples"] * n_pairs  # se² ≈ V / (samples · P)
        flagged = flagged[torch.sort(bound_estimate[flagged].abs(), descending=True, stable=True).indices]
        next_samples = plan_samples(len(unverified) - len(flagged), n_pairs, theta, alpha_round / 2, sum_sq)
        cap = max(n_pairs * (next_samples + 2), float(search.verify_cost(flagged[:1])[-1]) if len(flagged) else 0.0)
        within = int((search.verify_cost(flagged) <= cap).sum()) if len(flagged) else 0
        if float(search.verify_cost(unverified)[-1]) <= n_pairs * (next_samples + 2):
            within = 0  # the next round verifies everything left at once: no separate pass over the flagged
        chunk = flagged[:within]
        fit = search.affordable(chunk)
        if fit < len(chunk):
            stopped = "budget spent while verifying what the bound could not rule out"
        effects = search.verify(chunk[:fit], "verify_bound_order")
        not_ruled_out[chunk[:fit]] = False
        hits = int((effects.mean(1).abs() >= threshold).sum())
        # Nodes just verified leave the sum of squares the next bound's noise comes from (at most 4x less).
        removed = float((effects**2).sum(0).mean()) if len(effects) else 0.0
        sum_sq = max(sum_sq - removed, sum_sq / 4)
        history.append(_row(round_index, "bound", fit, hits, search, bound, n_flagged=len(flagged)))
        say(
            f"round {round_index}: bound {bound.max_effect_upper:.3g} >= {theta:g} ({len(flagged)} nodes not ruled out, "
            f"{samples} samples, p {choose_p(samples):.3g}); verified {fit}, {hits} with |c| >= {theta:g}"
        )
    else:
        stopped = stopped or f"max_rounds={max_rounds} rounds without a certificate"
    if not certified and not stopped:
        stopped = f"max_rounds={max_rounds} rounds without a certificate"

    return _result(
        search,
        estimate_result,
        bound,
        certified,
        theta,
        alpha,
        history,
        exhaustive,
        stopped,
        not_ruled_out,
        {
            "patience": window,
            "max_rounds": max_rounds,
            "seed": seed,
            "budget": budget,
            "estimator_options": estimator_options or {},
        },
    )


def _estimate_or_check(
    model: Model,
    pairs: PromptPairs,
    estimator: Any,
    node_types: list[str],
    direction: str,
    estimator_options: dict[str, Any] | None,
) -> Attribution | None:
    """The given ``Attribution`` after checking it fits, or None for a method id (checked here)."""
    if isinstance(estimator, Attribution):
        missing = [t for t in node_types if t not in estimator.scores]
        if missing:
            raise InputError(f"the estimate has no scores for node types {missing}; estimate them or drop them")
        for t in node_types:
            want = node_shape(t, model.sizes, pairs.seq_len)
            if tuple(estimator.scores[t].shape) != want or estimator.per_pair[t].shape[0] != pairs.n_pairs:
                raise InputError(
                    f"the estimate's {t!r} scores have shape {tuple(estimator.scores[t].shape)} over "
                    f"{estimator.per_pair[t].shape[0]} pairs; these pairs need {want} over {pairs.n_pairs}"
                )
        if estimator.direction != direction:
            raise InputError(f"the estimate is {estimator.direction}; call find with direction={estimator.direction!r}")
        return estimator
    if not isinstance(estimator, str) or estimator not in METHODS:
        raise InputError(f"unknown estimator {estimator!r}; choose a method id from: {', '.join(METHODS)}")
    if estimator_options is not None and not isinstance(estimator_options, dict):
        raise InputError(f"estimator_options must be a dict of {estimator}'s options; got {estimator_options!r}")
    return None


def _check_number(name: str, value: Any, what: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{name} must be {what}; got {value!r}")


def _row(
    round_index: int,
    stage: str,
    n_verified: int,
    n_found: int,
    search: _Search,
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


def _exhaustive_bound(search: _Search, theta: float, alpha: float) -> FalseNegativeBound:
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


def _result(
    search: _Search,
    estimate: Attribution,
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
    n_pairs = search.pairs.n_pairs
    effects = torch.stack(search.effects) if search.effects else torch.zeros(0, n_pairs, dtype=torch.float64)
    mean = effects.mean(1)  # [N verified]
    threshold = theta * (1 - THETA_TOLERANCE)
    strong = torch.nonzero(mean.abs() >= threshold)[:, 0]
    strong = strong[torch.sort(mean[strong].abs(), descending=True, stable=True).indices]
    verified_nodes = search.verified_nodes()
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
        info={"estimate_method": estimate.method, "stage": list(search.stage_of), "n_nodes": len(search.weight)},
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
        estimator=estimate.method,
        direction=search.direction,
        metric=search.pairs.metric_name,
        model_id=search.model.model_id,
        info={"stopped": "certified" if certified else stopped, "left": left, **options},
    )


def _say(message: str) -> None:
    tqdm.write(f"[find] {message}")
