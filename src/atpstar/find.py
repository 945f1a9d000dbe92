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
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .api import attribute
from .bound import MIN_SAMPLES, P_MAX, bound_cost, choose_p, plan_samples
from .errors import InputError
from .find_resume import CHECKPOINT_NAME, FindJournal, digest, find_identity
from .find_state import THETA_TOLERANCE, Search, exhaustive_bound, history_row, localization, population
from .localization import Localization
from .methods import METHODS
from .model import Model, as_model
from .nodes import EDGE_TYPE, check_node_types
from .pairs import PromptPairs, check_direction
from .result import Attribution


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
    checkpoint: str | Path | None = None,
    out_dir: str | Path | None = None,
    recompute: bool = False,
) -> Localization:
    """Find every node with |c(n)| >= ``theta`` and certify that no other node is that large.

    Args:
        model: an ``atpstar.Model`` or a ``transformers`` causal LM.
        pairs: the prompt pairs; c(n) is the exact effect of patching n alone, averaged over them.
        theta: the effect size sought (in metric units, e.g. logit difference), > 0.
        nodes: node types to search (``neuron``, ``query``, ``key``, ``value``, ``head``), or ``["edge"]``
            alone for the edges of the MIB/EAP-IG graph (estimated by the edge estimators, verified by exact
            edge patching, bounded by random joint patches of edge subsets; in-process only).
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
        checkpoint: a file where each completed step (estimate, verification call, bound) is saved; a rerun
            with the same file and computation resumes after the last completed step, and its cost is the
            whole work's (``atpstar.find_resume``). Another computation's file is refused, naming what
            differs; a corrupt one is reported and ignored. None: nothing is saved (unless ``out_dir``).
        out_dir: a folder: the checkpoint goes to ``out_dir/find.ckpt.safetensors`` and the result to
            ``out_dir/localization.json``/``.safetensors`` when the loop ends.
        recompute: discard the checkpoint and start afresh.

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
    if EDGE_TYPE in node_types and (node_types != [EDGE_TYPE] or workers is not None or ray_address is not None):
        raise InputError("find over edges runs on edges alone and in-process: nodes=['edge'], no workers=/ray_address=")
    if isinstance(estimator_options, dict) and estimator_options.get("edge_positions"):
        raise InputError("find does not search position-resolved edges; drop edge_positions from estimator_options")
    direction = check_direction(direction)
    shapes, weight = population(model, node_types, pairs.seq_len)  # weight: [N]
    estimate = _estimate_or_check(model, pairs, estimator, node_types, shapes, direction, estimator_options)
    model.check_ready(torch.cat([pairs.clean, pairs.noise]))
    window = patience or max(16, math.ceil(len(weight) / 200))
    if out_dir is not None:
        checkpoint = Path(out_dir) / CHECKPOINT_NAME if checkpoint is None else checkpoint
    named = str(estimator) if estimate is None else f"{estimate.method}#{digest(_flat(estimate.scores, node_types))}"
    current = find_identity(
        model,
        pairs,
        direction,
        node_types,
        theta,
        alpha,
        named,
        {"seed": seed, "patience": window, "estimator_options": estimator_options or {}},
    )
    journal = FindJournal.open(checkpoint, current, recompute)
    say = _say if progress else (lambda message: None)
    if journal.saved_steps:
        say(f"resuming from {checkpoint}: {journal.saved_steps} completed steps")

    n_pairs = pairs.n_pairs
    exhaustive = n_pairs * (2.0 + float(weight.sum()))
    engine: dict[str, Any] = {"workers": workers, "ray_address": ray_address}
    search = Search(model, pairs, node_types, shapes, weight, direction, budget, progress, batch_size, engine, journal)
    if estimate is not None:
        search.use_estimate(_flat(estimate.scores, node_types), estimate.cost)
        per_pair = torch.cat([estimate.per_pair[t].double().flatten(1) for t in node_types], 1)  # [P, N]
        estimate_method = estimate.method
    else:
        per_pair, estimate_method = search.estimate(
            str(estimator),
            estimator_options or {},
            lambda: attribute(
                model,
                pairs,
                str(estimator),
                node_types,
                direction=direction,
                progress=progress,
                **(estimator_options or {}),
            ),
        )
    scores = search.estimate_score  # [N]
    history: list[dict[str, Any]] = []
    n_nodes = len(weight)
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
        saved *= search.sample_cost(P_MAX)
        if hits == 0 and saved < window_cost:
            break
    history.append(history_row(0, "verify_estimate_order", position, found_here, search, None))
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
        unit = search.sample_cost(choose_p(samples))  # forward equivalents of one joint patch (1 for nodes)
        if rest_cost <= n_pairs * (samples * unit + 2):
            # Exact is cheaper than a bound: verify everything left (certified without assumption).
            fit = search.affordable(unverified)
            effects = search.verify(unverified[:fit], "verify_rest")
            hits = int((effects.mean(1).abs() >= threshold).sum())
            if fit < len(unverified):
                stopped = "budget spent while verifying the remaining nodes"
            else:
                certified = True
                bound = exhaustive_bound(search, theta, alpha)
            history.append(history_row(round_index, "verify_rest", fit, hits, search, bound, certified=certified))
            say(f"round {round_index}: verified the {fit} remaining nodes exactly")
            break
        affordable = samples if budget is None else _affordable_samples(search.left, n_pairs, unit)
        if affordable < MIN_SAMPLES:
            stopped = f"budget spent: a bound needs {n_pairs * (MIN_SAMPLES + 2)} forward equivalents"
            break
        samples = min(samples, affordable)
        bound = search.bound(theta, samples, choose_p(samples), alpha_round, seed + round_index, memory_gb)
        upper = torch.cat([bound.upper[t].flatten() for t in node_types])  # [N], nan at verified nodes
        bound_estimate = torch.cat([bound.estimate[t].flatten() for t in node_types])
        flagged = torch.nonzero((upper >= theta) & ~search.verified)[:, 0]  # inf (too few samples) counts
        not_ruled_out = torch.zeros(n_nodes, dtype=torch.bool)
        not_ruled_out[flagged] = True
        if bound.max_effect_upper < theta:
            certified = True
            history.append(history_row(round_index, "bound", 0, 0, search, bound, certified=True))
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
        next_cost = n_pairs * (next_samples * unit + 2)
        cap = max(next_cost, float(search.verify_cost(flagged[:1])[-1]) if len(flagged) else 0.0)
        within = int((search.verify_cost(flagged) <= cap).sum()) if len(flagged) else 0
        if float(search.verify_cost(unverified)[-1]) <= next_cost:
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
        history.append(history_row(round_index, "bound", fit, hits, search, bound, n_flagged=len(flagged)))
        say(
            f"round {round_index}: bound {bound.max_effect_upper:.3g} >= {theta:g} ({len(flagged)} nodes not ruled out, "
            f"{samples} samples, p {choose_p(samples):.3g}); verified {fit}, {hits} with |c| >= {theta:g}"
        )
    else:
        stopped = stopped or f"max_rounds={max_rounds} rounds without a certificate"
    if not certified and not stopped:
        stopped = f"max_rounds={max_rounds} rounds without a certificate"

    options = {
        "patience": window,
        "max_rounds": max_rounds,
        "seed": seed,
        "budget": budget,
        "estimator_options": estimator_options or {},
    }
    if journal.replayed:
        options["resumed"] = {
            "checkpoint": str(checkpoint),
            "steps": journal.replayed,
            "cost_fe": journal.replayed_cost,
        }
    found = localization(
        search,
        estimate_method,
        bound,
        certified,
        theta,
        alpha,
        history,
        exhaustive,
        stopped,
        not_ruled_out,
        options,
    )
    if out_dir is not None:
        found.save(Path(out_dir) / "localization")
    return found


def _estimate_or_check(
    model: Model,
    pairs: PromptPairs,
    estimator: Any,
    node_types: list[str],
    shapes: dict[str, tuple[int, ...]],
    direction: str,
    estimator_options: dict[str, Any] | None,
) -> Attribution | None:
    """The given ``Attribution`` after checking it fits, or None for a method id (checked here)."""
    if isinstance(estimator, Attribution):
        missing = [t for t in node_types if t not in estimator.scores]
        if missing:
            raise InputError(f"the estimate has no scores for node types {missing}; estimate them or drop them")
        for t in node_types:
            want = shapes[t]
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


def _affordable_samples(left: float, n_pairs: int, unit: float) -> int:
    """Samples per pair a bound can take within ``left`` forward equivalents (2P of them prepare the bound)."""
    if unit == 1.0:
        return math.floor(left / n_pairs) - 2
    return math.floor((left / n_pairs - 2) / unit)


def _flat(scores: dict[str, torch.Tensor], node_types: list[str]) -> torch.Tensor:
    """[N] float64 scores of every node type, on the flat node axis."""
    return torch.cat([scores[t].double().flatten() for t in node_types])


def _check_number(name: str, value: Any, what: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{name} must be {what}; got {value!r}")


def _say(message: str) -> None:
    tqdm.write(f"[find] {message}")
