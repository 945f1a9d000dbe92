"""The stages of ``atpstar.find`` (verify in estimate order, then bound rounds) and the record they add up to.

Each stage reads and advances one ``Search`` (``find.state``) and one ``Outcome`` (where the loop stands:
the last bound, whether it certified, why it stopped, its history). The rules are those of the ``find``
module docstring.

Shape letters: P pairs, N nodes (all node types, flattened), K nodes of one step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..bound import PLAN_IN_SAMPLES, FalseNegativeBound, plan_samples, planned_p
from ..bound.calibration import Calibration, next_p
from ..cost import Cost
from .calibrate import calibration_cost, check_bound, measured_p, rescue
from .options import FindOptions
from .state import NO_ASSUMPTION, THETA_TOLERANCE, Search

Say = Callable[[str], None]  # one progress line (or nothing)


@dataclass
class Outcome:
    """Where the loop stands."""

    not_ruled_out: torch.Tensor  # [N] bool: flagged by the last bound and not verified since
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per stage run (``history_row``)
    stopped: str = ""  # why the loop stopped early ("" while it runs or when certified)
    certified: bool = False
    bound: FalseNegativeBound | None = None  # the last bound (an exact one when every node was verified)
    fallback: str = ""  # why the search patched every node exhaustively instead ("" when it did not)
    calibration: Calibration | None = None  # the last bound's calibration (None: none ran)
    p_next: float | None = None  # the inclusion probability the measured interaction asks of the next bound
    finish: str = ""  # why the rest was verified exactly after the loop began ("" when it was not)


def verify_in_estimate_order(
    search: Search, outcome: Outcome, per_pair: torch.Tensor, window: int, options: FindOptions, say: Say
) -> None:
    """Stage 1: verify in estimate order, in windows of ``window`` nodes, while the windows pay for themselves.

    A window pays when the first bound's plan (``plan_samples`` on the estimate's V of the nodes left, as round 1
    plans it) drops by more than the window costs. Once that plan is at its floor, verifying more saves nothing:
    the stage stops there even after a window that found nodes >= θ (the bound flags what is left of them).

    Args:
        per_pair: [P, N] the estimate's per-pair scores.
    """
    theta, alpha = options.theta, options.alpha
    threshold = theta * (1 - THETA_TOLERANCE)
    order = torch.sort(search.estimate_score.abs(), descending=True, stable=True).indices  # [N]
    squares = (per_pair**2).mean(0)  # [N] each node's share of V = mean over pairs of Σ c_j(n)²
    position, found_here = 0, 0
    while position < len(order) and not outcome.stopped and search.may_call():
        chunk = order[position : position + window]
        fit = search.affordable(chunk)
        if fit < len(chunk):
            outcome.stopped = search.limit_reason("while verifying in estimate order")
            chunk = chunk[:fit]
        window_cost = float(search.verify_cost(chunk)[-1]) if len(chunk) else 0.0
        before = _first_bound_cost(search, squares, alpha)
        effects = search.verify(chunk, "verify_estimate_order")  # [K, P]
        saved = before - _first_bound_cost(search, squares, alpha)
        position += len(chunk)
        hits = int((effects.mean(1).abs() >= threshold).sum())
        found_here += hits
        if saved < window_cost and (hits == 0 or saved <= 0):
            break
    outcome.history.append(history_row(0, "verify_estimate_order", position, found_here, search, None))
    say(f"estimate order: verified {position} nodes, {found_here} with |c| >= {theta:g}")


def _first_bound_cost(search: Search, squares: torch.Tensor, alpha: float) -> float:
    """Forward equivalents of the samples the first bound would plan over the nodes now unverified (``squares``:
    [N] each node's mean squared per-pair estimate), at round 1's error rate (half of α / 2)."""
    unverified = ~search.verified
    samples = plan_samples(int(unverified.sum()), search.job.n_pairs, search.options.theta, alpha / 4,
                           float(squares[unverified].sum()))  # fmt: skip
    return search.job.n_pairs * samples * search.sample_cost(planned_p(samples))


def exhaustive_fallback(search: Search, outcome: Outcome, options: FindOptions, reason: str, say: Say) -> None:
    """Patch every unverified node in one call, at exhaustive patching's cost: exact, certified with no assumption."""
    unverified = torch.nonzero(~search.verified)[:, 0]
    effects = search.verify(unverified, "verify_rest")  # [K, P]
    hits = int((effects.mean(1).abs() >= options.theta * (1 - THETA_TOLERANCE)).sum())
    outcome.certified, outcome.fallback = True, reason
    outcome.bound = exhaustive_bound(search, options.theta, options.alpha)
    row = history_row(0, "verify_rest", len(unverified), hits, search, outcome.bound, certified=True)
    outcome.history.append({**row, "fallback": reason})
    say(f"exhaustive patching of all {len(unverified)} nodes: {reason}")


def bound_rounds(search: Search, outcome: Outcome, per_pair: torch.Tensor, options: FindOptions, say: Say) -> None:
    """Stages 3-4: bound the unverified nodes, calibrate a bound below θ, verify what the bound cannot rule out,
    until certified or stopped.

    Args:
        per_pair: [P, N] the estimate's per-pair scores (the first round's guess at V = mean_j Σ c_j(n)²).
    """
    if search.spent > search.limit:
        outcome.stopped = search.limit_reason("by the estimate")
    sum_sq = float((per_pair[:, ~search.verified] ** 2).sum(1).mean())  # V: mean over pairs of Σ c_j(n)²
    for round_index in range(1, options.max_rounds + 1):
        if outcome.stopped or outcome.certified:
            break
        sum_sq = _round(search, outcome, round_index, sum_sq, options, say)
    if not outcome.certified and not outcome.stopped:  # the rest always fits the ceiling (``Search.slack``)
        why = f"max_rounds={options.max_rounds} bound rounds did not certify"
        _verify_rest(search, outcome, options.max_rounds + 1, options, say, why)


def _plan(search: Search, outcome: Outcome, n_unverified: int, alpha_bound: float, sum_sq: float) -> tuple[int, float]:
    """(samples per pair, p) of the next bound: samples planned from V, p from the measured interaction (the
    smaller of ``planned_p(samples)`` and what the last measured shrinkage asks for, with samples raised so that
    each node is still in about ``PLAN_IN_SAMPLES`` of them)."""
    samples = plan_samples(n_unverified, search.job.n_pairs, search.options.theta, alpha_bound, sum_sq)
    p = planned_p(samples)
    if outcome.p_next is not None and outcome.p_next < p:
        p = outcome.p_next
        samples = max(samples, math.ceil(PLAN_IN_SAMPLES / p))
    return samples, p


def _round(search: Search, outcome: Outcome, round_index: int, sum_sq: float, options: FindOptions, say: Say) -> float:
    """One round: verify everything left when that is cheaper than a bound and its calibration, or when a bound
    no longer fits the slack (its worst case, failing and then verifying the rest, would pass the ceiling); else
    bound, calibrate a bound below θ, and verify what it flags. Returns the next round's V.

    Round r has error rate α / 2^r: half for the bound's intervals, half for the calibration.
    """
    n_pairs = search.job.n_pairs
    alpha_bound = options.alpha / 2**round_index / 2
    samples, p = _plan(search, outcome, int((~search.verified).sum()), alpha_bound, sum_sq)
    unit = search.sample_cost(p)  # forward equivalents of one joint patch (1 for nodes)
    calibration = calibration_cost(search)
    if search.rest_cost <= n_pairs * (samples * unit + 2) + calibration:
        _verify_rest(search, outcome, round_index, options, say, "verifying the rest cost no more than a bound")
        return sum_sq
    # The gamble: the planned bound (fewer samples would rarely rule anything out) and its calibration's base and
    # source runs, within the slack and the budget.
    room = min(search.slack - 2.0 * n_pairs, search.budget_left - calibration)
    if _affordable_samples(room, n_pairs, unit) < samples:
        why = (
            f"a bound of {samples} samples no longer fit max_overspend={options.max_overspend:g}"
            if room < search.budget_left - calibration
            else "the budget left could not pay for a bound"
        )
        _verify_rest(search, outcome, round_index, options, say, why)
        return sum_sq
    bound = outcome.bound = search.bound(samples, p, alpha_bound, options.seed + round_index)
    upper = search.layout.flatten(bound.upper)  # [N], nan at verified nodes
    flagged = torch.nonzero((upper >= options.theta) & ~search.verified)[:, 0]  # inf (too few samples) counts
    outcome.not_ruled_out = torch.zeros(len(upper), dtype=torch.bool)
    outcome.not_ruled_out[flagged] = True
    if bound.max_effect_upper < options.theta:
        outcome.history.append(history_row(round_index, "bound", 0, 0, search, bound))
        return _calibrate(search, outcome, bound, round_index, alpha_bound, sum_sq, options, say)
    return _verify_flagged(search, outcome, bound, flagged, round_index, sum_sq, unit, options, say)


def _calibrate(
    search: Search,
    outcome: Outcome,
    bound: FalseNegativeBound,
    round_index: int,
    alpha: float,
    sum_sq: float,
    options: FindOptions,
    say: Say,
    flagged: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> float:
    """A bound below θ on every unverified node: certified when its calibration (at error rate ``alpha``) passes;
    else the next round bounds at the p the measured shrinkage asks for. Returns the next round's V.

    Args:
        flagged: ([K] flat indices, [K, P] exact effects) of the nodes this bound flagged and that were verified
            since: the bound's highest-ranked nodes, checked with the calibration's sample.
    """
    found, widened = check_bound(search, bound, alpha, options.seed + round_index, flagged)
    if found is None:
        outcome.stopped = search.limit_reason("calibrating the bound")
        return sum_sq
    outcome.bound, outcome.calibration = widened, found
    outcome.not_ruled_out &= ~search.verified
    n_checked = found.checked - (len(flagged[0]) if flagged is not None else 0)  # the flagged ones: verified before
    row = history_row(round_index, "calibrate", n_checked, found.large, search, widened, certified=found.passed)
    outcome.history.append({**row, "calibration": found.to_dict()})
    if found.passed:
        outcome.certified = True
        say(
            f"round {round_index}: certified after calibration ({found.checked} nodes checked, shrinkage "
            f"{found.shrinkage:.3g}, widened by {found.widen:.3g}): max |c| of {widened.n_unverified} unverified "
            f"<= {widened.max_effect_upper:.3g}"
        )
        return sum_sq
    floor = 1.0 / max(int((~search.verified).sum()), 1)
    outcome.p_next = next_p(float(bound.info["p"]), found.shrinkage, floor)
    say(f"round {round_index}: bound below {options.theta:g} but calibration failed: {found.reason}")
    return _measured_sum_sq(bound, search.job.n_pairs, sum_sq)


def _measured_sum_sq(bound: FalseNegativeBound, n_pairs: int, sum_sq: float) -> float:
    """V from the bound's measured standard errors (se² ≈ V / (samples · P)), else the old guess."""
    measured = bound.info.get("se_median", float("nan"))
    if math.isfinite(measured) and measured > 0:
        return measured**2 * bound.info["samples"] * n_pairs
    return sum_sq


def _verify_rest(search: Search, outcome: Outcome, round_index: int, options: FindOptions, say: Say, why: str) -> None:
    """Verify everything left (certified by exhaustion, no assumption); ``why``: why the loop finishes this way.

    The ceiling leaves room for it (``Search.slack``), and it is not cut at the ceiling (a step that cost more than
    it was priced at must not leave the search uncertified); only the user's budget can cut it short. Then the
    nodes the last bound ranks highest go first, and the last calibrated bound may still cover the rest
    (``calibrate.rescue``); else the search stops, not certified.
    """
    unverified = torch.nonzero(~search.verified)[:, 0]
    fits = search.affordable(unverified, ceiling=False) == len(unverified)
    if not fits and outcome.bound is not None and outcome.bound.upper:
        upper = search.layout.flatten(outcome.bound.upper)[unverified].nan_to_num(nan=math.inf)  # [K]
        unverified = unverified[torch.sort(upper, descending=True, stable=True).indices]
    fit = search.affordable(unverified, ceiling=False)
    effects = search.verify(unverified[:fit], "verify_rest")  # [K, P]
    hits = int((effects.mean(1).abs() >= options.theta * (1 - THETA_TOLERANCE)).sum())
    rescued = rescue(search, outcome.bound) if fit < len(unverified) else None
    if rescued is not None:  # the last calibrated bound covers what the budget left unverified
        outcome.calibration, outcome.bound = rescued
        outcome.certified = True
    elif fit < len(unverified):
        outcome.stopped = search.limit_reason("while verifying the remaining nodes")
    else:
        outcome.certified, outcome.finish = True, why
        outcome.bound = exhaustive_bound(search, options.theta, options.alpha)
    row = history_row(round_index, "verify_rest", fit, hits, search, outcome.bound, certified=outcome.certified)
    outcome.history.append({**row, "why": why})
    say(f"round {round_index}: verified the {fit} remaining nodes exactly ({why})")


def _verify_flagged(
    search: Search,
    outcome: Outcome,
    bound: FalseNegativeBound,
    flagged: torch.Tensor,
    round_index: int,
    sum_sq: float,
    unit: float,
    options: FindOptions,
    say: Say,
) -> float:
    """Verify what the bound cannot rule out, its largest estimates first; when noise flags many nodes, spend
    at most what the next bound would cost and let that bound (more samples) sort them. The verified ones
    measure the interaction shrinkage for the next bound's p. Returns the next V."""
    theta, n_pairs = options.theta, search.job.n_pairs
    unverified = torch.nonzero(~search.verified)[:, 0]
    estimate = search.layout.flatten(bound.estimate)  # [N]
    sum_sq = _measured_sum_sq(bound, n_pairs, sum_sq)
    flagged = flagged[torch.sort(estimate[flagged].abs(), descending=True, stable=True).indices]
    next_samples = plan_samples(len(unverified) - len(flagged), n_pairs, theta, bound.alpha / 2, sum_sq)
    next_cost = n_pairs * (next_samples * unit + 2) + calibration_cost(search)
    cap = max(next_cost, float(search.verify_cost(flagged[:1])[-1]) if len(flagged) else 0.0)
    within = int((search.verify_cost(flagged) <= cap).sum()) if len(flagged) else 0
    if float(search.verify_cost(unverified)[-1]) <= next_cost or not search.may_call():
        within = 0  # the next round verifies everything left at once: no separate pass over the flagged
    chunk = flagged[:within]
    fit = search.affordable(chunk)
    if fit < len(chunk):
        outcome.stopped = search.limit_reason("while verifying what the bound could not rule out")
    effects = search.verify(chunk[:fit], "verify_bound_order")  # [K, P]
    outcome.not_ruled_out[chunk[:fit]] = False
    outcome.p_next = measured_p(search, bound, chunk[:fit], effects)
    hits = int((effects.mean(1).abs() >= theta * (1 - THETA_TOLERANCE)).sum())
    # Nodes just verified leave the sum of squares the next bound's noise comes from (at most 4x less).
    removed = float((effects**2).sum(0).mean()) if len(effects) else 0.0
    outcome.history.append(history_row(round_index, "bound", fit, hits, search, bound, n_flagged=len(flagged)))
    say(
        f"round {round_index}: bound {bound.max_effect_upper:.3g} >= {theta:g} ({len(flagged)} nodes not ruled out, "
        f"{bound.info['samples']} samples, p {bound.info['p']:.3g}); verified {fit}, {hits} with |c| >= {theta:g}"
    )
    if len(flagged) and fit == len(flagged) and search.may_call():
        # Every node it could not rule out is now exact, so it bounds the rest below θ: calibrate it in this round
        # (its intervals are unspent: no round certified on them) instead of paying for a new bound.
        verified = (chunk[:fit], effects)  # they measure the interaction with the calibration's sample
        return _calibrate(search, outcome, bound, round_index, bound.alpha, sum_sq, options, say, verified)
    return max(sum_sq - removed, sum_sq / 4)


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
        direction=search.job.direction,
        info={"samples": 0, "p": None},
    )


def _affordable_samples(left: float, n_pairs: int, unit: float) -> int:
    """Samples per pair a bound can take within ``left`` forward equivalents (2P of them prepare the bound)."""
    if unit == 1.0:
        return math.floor(left / n_pairs) - 2
    return math.floor((left / n_pairs - 2) / unit)
