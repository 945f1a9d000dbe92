"""Planning of ``atpstar.find`` before and just after its estimate: whether to patch every node at once instead.

Shape letters: P pairs, N nodes (all node types, flattened).
"""

from __future__ import annotations

import torch

from ..bound import MIN_SAMPLES, choose_p, plan_samples, planned_p
from .calibrate import calibration_cost
from .options import FindOptions
from .state import Search


def fallback_reason(search: Search, estimate: float | None) -> str:
    """Why patching every node exhaustively is the plan ("" when the loop should run).

    Exhaustive patching costs P (2 + Σ weight); the loop at least pays for its estimate (``estimate``: still to
    run; None when unknown) and one bound of ``MIN_SAMPLES`` samples. When that is no cheaper, exhaustive
    patching within the budget is taken instead: exact, and never dearer than ``activation_patching``.
    """
    n_pairs = search.job.n_pairs
    exhaustive = search.rest_cost
    bound = n_pairs * (MIN_SAMPLES * search.sample_cost(choose_p(MIN_SAMPLES)) + 2) + calibration_cost(search)
    planned = (estimate or 0.0) + bound
    if planned < exhaustive or exhaustive > search.left + 1e-9:
        return ""
    return (
        f"the estimate and one calibrated bound would cost at least {planned:g} forward equivalents, no less than "
        f"exhaustive patching ({exhaustive:g})"
    )


def fallback_planned(search: Search, per_pair: torch.Tensor, window: int, options: FindOptions) -> str:
    """After the estimate: why exhaustive patching is the plan ("" when the loop should run), now that the
    first bound can be planned from the estimate (``per_pair``: [P, N]) as the first round plans it.

    The loop's next steps cost at least its first window (the estimate's top ``window`` nodes) and that bound;
    when they are no cheaper than patching every node, patching every node is cheaper and exact.
    """
    n_pairs, theta = search.job.n_pairs, options.theta
    exhaustive = search.rest_cost
    order = torch.sort(search.estimate_score.abs(), descending=True, stable=True).indices  # [N]
    top, rest = order[:window], order[window:]
    if len(rest) == 0 or exhaustive > search.left + 1e-9:
        return ""
    sum_sq = float((per_pair[:, rest] ** 2).sum(1).mean())  # V of the nodes the first bound would cover
    samples = plan_samples(len(rest), n_pairs, theta, options.alpha / 4, sum_sq)  # round 1: half of α / 2
    bound = n_pairs * (samples * search.sample_cost(planned_p(samples)) + 2) + calibration_cost(search)
    planned = float(search.verify_cost(top)[-1]) + bound
    if planned < exhaustive:
        return ""
    return (
        f"the first window and the first calibrated bound ({samples} samples) would cost {planned:g} forward "
        "equivalents, "
        f"no less than exhaustive patching ({exhaustive:g})"
    )
