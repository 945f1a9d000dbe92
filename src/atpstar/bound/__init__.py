"""False-negative bounds: how large an effect could hide among the nodes verification did not reach.

- ``verb``: ``false_negative_bound`` (check, sample the unverified nodes, combine);
- ``statistics``: per-node Welch bounds and their combination (the maths);
- ``planning``: samples, inclusion probability and cost of a bound (``choose_p``, ``plan_samples``, ...);
- ``record``: the ``FalseNegativeBound`` result.
"""

from __future__ import annotations

from .planning import (
    DEFAULT_SAMPLES,
    MIN_IN_SAMPLES,
    MIN_SAMPLES,
    P_MAX,
    PLAN_IN_SAMPLES,
    PLAN_MIN_SAMPLES,
    SAFETY,
    bound_cost,
    choose_p,
    noise_quantile,
    plan_samples,
    planned_p,
)
from .record import ASSUMPTION, FalseNegativeBound
from .statistics import COMBINES
from .verb import false_negative_bound

__all__ = [
    "ASSUMPTION",
    "COMBINES",
    "DEFAULT_SAMPLES",
    "MIN_IN_SAMPLES",
    "MIN_SAMPLES",
    "PLAN_IN_SAMPLES",
    "PLAN_MIN_SAMPLES",
    "P_MAX",
    "SAFETY",
    "FalseNegativeBound",
    "bound_cost",
    "choose_p",
    "false_negative_bound",
    "noise_quantile",
    "plan_samples",
    "planned_p",
]
