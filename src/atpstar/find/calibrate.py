"""Calibration stage of ``atpstar.find``: before a bound certifies, check it on nodes patched exactly.

A bound that falls below θ certifies only after calibration passes (``bound.calibration``): a sample of the
nodes it covers (its highest-ranked and stratified random ones) is verified on the search's own exact path
(``Search.verify``, journaled, its cost counted as the ``calibrate`` stage), the interaction shrinkage is
measured from them, and the bound is widened by it. The checked nodes are verified nodes from then on (a
large one is found, not missed). The same shrinkage, measured for free on the nodes a bound flagged and that
were then verified, sets the next bound's inclusion probability (``bound.calibration.next_p``).

Shape letters: P pairs, N nodes (all node types, flattened), K checked nodes.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..bound import FalseNegativeBound
from ..bound.calibration import (
    CALIBRATED_ASSUMPTION,
    CALIBRATION_RANDOM,
    CALIBRATION_TOP,
    Calibration,
    calibrate,
    calibration_sample,
    next_p,
    shrinkage,
)
from .state import Search


def calibration_cost(search: Search) -> float:
    """Forward equivalents a calibration is planned at: one verification call of about K typical unverified nodes."""
    unverified = ~search.verified
    n_left = int(unverified.sum())
    if n_left == 0:
        return 0.0
    k = min(n_left, CALIBRATION_TOP + CALIBRATION_RANDOM)
    return search.job.n_pairs * (2.0 + k * float(search.weight[unverified].mean()))


def check_bound(
    search: Search,
    bound: FalseNegativeBound,
    alpha: float,
    seed: int,
    flagged: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[Calibration | None, FalseNegativeBound]:
    """Calibrate a bound whose max_n U(n) < θ: (the calibration, the widened bound), or (None, the bound) when
    the budget cannot pay for the checked nodes (nothing is patched then). The round planned the calibration with
    its bound (``calibration_cost``) within the search's slack (``Search.slack``), so only the user's budget can cut
    it.

    Args:
        alpha: the calibration's error rate (the round's other half goes to the bound).
        seed: draws the random part of the sample.
        flagged: ([F] flat indices, [F, P] exact effects) of nodes the bound flagged (U >= θ) that were verified
            since: its highest-ranked nodes, checked together with the sample (they carry the signal that measures
            the shrinkage; not counted as misses, the bound did not rule them out).
    """
    keep = ~search.verified  # [N] the bound's population less the nodes verified since it ran
    upper, estimate, se = (_flat(search, bound, name) for name in ("upper", "estimate", "se"))
    sample, top = calibration_sample(upper, estimate, keep, seed, CALIBRATION_TOP, CALIBRATION_RANDOM)  # [K]
    if search.affordable(sample) < len(sample):
        return None, bound
    effects = search.verify(sample, "calibrate")  # [K, P]
    n_flagged = 0 if flagged is None else len(flagged[0])
    if flagged is not None and n_flagged:
        sample, effects, top = torch.cat([flagged[0], sample]), torch.cat([flagged[1], effects]), top + n_flagged
    rest = ~search.verified
    rest_max = float(upper[rest].max()) if bool(rest.any()) else 0.0
    checked = {"exact": effects.mean(1), "estimate": estimate[sample], "se": se[sample], "upper": upper[sample]}
    found = calibrate(checked, top, rest_max, search.options.theta, alpha, bound.alpha, n_flagged)
    widened = replace(
        bound,
        max_effect_upper=found.max_upper if math.isfinite(found.widen) else math.inf,
        n_unverified=int(rest.sum()),
        assumption=CALIBRATED_ASSUMPTION,
        info={**bound.info, "calibration": found.to_dict(), "uncalibrated_max_effect_upper": bound.max_effect_upper},
    )
    return found, widened


def measured_p(search: Search, bound: FalseNegativeBound, checked: torch.Tensor, effects: torch.Tensor) -> float:
    """The next bound's inclusion probability from the shrinkage on nodes of ``bound`` since verified exactly.

    Args:
        checked: [K] flat indices of those nodes; effects: [K, P] their exact effects.
    """
    p = float(bound.info["p"])
    if len(checked) == 0:
        return p
    estimate, se = (_flat(search, bound, name)[checked] for name in ("estimate", "se"))
    measured = shrinkage(effects.mean(1), estimate, se, bound.alpha)
    floor = 1.0 / max(int((~search.verified).sum()), 1)  # about one node per joint patch
    return next_p(p, measured.estimate, floor)


def rescue(search: Search, bound: FalseNegativeBound | None) -> tuple[Calibration, FalseNegativeBound] | None:
    """A calibrated bound that failed only because its widened maximum reached θ, re-read over the nodes still
    unverified (the ones it ranked highest were verified since): (the calibration, the bound) when it now lies
    below θ, else None. Same samples, same checked nodes, same level: only the maximum is over fewer nodes."""
    figures = None if bound is None else bound.info.get("calibration")
    if bound is None or figures is None or figures["large"] or figures["outside"] > figures["allowed"]:
        return None
    widen, rest = float(figures["widen"]), ~search.verified
    if not math.isfinite(widen) or not bool(rest.any()):
        return None
    max_upper = widen * float(search.layout.flatten(bound.upper)[rest].max())
    if not max_upper < search.options.theta:
        return None
    fields = {k: v for k, v in figures.items() if k != "level"}
    found = Calibration(**{**fields, "max_upper": max_upper, "passed": True, "reason": ""})
    info = {**bound.info, "calibration": found.to_dict()}
    return found, replace(bound, max_effect_upper=max_upper, n_unverified=int(rest.sum()), info=info)


def _flat(search: Search, bound: FalseNegativeBound, name: str) -> torch.Tensor:
    """[N] one of the bound's per-node tensors on the flat axis (nan where a bound saved before ``se`` has none)."""
    tensors = getattr(bound, name)
    if not tensors:
        return torch.full((len(search.weight),), float("nan"), dtype=torch.float64)
    return search.layout.flatten(tensors)
