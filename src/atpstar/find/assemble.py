"""The ``Localization`` a finished (or stopped) ``atpstar.find`` search adds up to.

Shape letters: P pairs, N nodes verified.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..cost import Cost
from ..verify import Verification
from .localization import STAGES, Localization
from .options import FindOptions
from .stages import Outcome
from .state import THETA_TOLERANCE, Search


def localization(
    search: Search, outcome: Outcome, estimate_method: str, options: FindOptions, info: dict[str, Any]
) -> Localization:
    """The ``Localization`` of a finished (or stopped) search; ``info``: the options and resume facts it records."""
    theta, alpha, bound, certified = options.theta, options.alpha, outcome.bound, outcome.certified
    n_pairs = search.job.n_pairs
    effects = torch.stack(search.effects) if search.effects else torch.zeros(0, n_pairs, dtype=torch.float64)
    mean = effects.mean(1)  # [N verified]
    threshold = theta * (1 - THETA_TOLERANCE)
    strong = torch.nonzero(mean.abs() >= threshold)[:, 0]
    strong = strong[torch.sort(mean[strong].abs(), descending=True, stable=True).indices]
    verified_nodes = search.verified_nodes()
    graph = search.facts.naming(search.job.model)  # what names the nodes without the model
    verification = Verification(
        nodes=verified_nodes,
        effects=effects,
        estimate_scores=search.estimate_score[torch.tensor(search.order, dtype=torch.long)]
        if search.order
        else torch.zeros(0, dtype=torch.float64),
        node_types=list(search.node_types),
        direction=search.job.direction,
        metric=search.job.pairs.metric_name,
        model_id=search.job.model.model_id,
        cost=search.cost.get("verify_estimate_order", Cost())
        + search.cost.get("calibrate", Cost())
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
        "n_not_ruled_out": int((outcome.not_ruled_out & ~search.verified).sum()),
        "max_effect_upper": None if bound is None else float(bound.max_effect_upper),
        "budget_left": None if search.options.budget is None else max(0.0, search.options.budget - search.spent),
        # the estimate + (1 + max_overspend) x exhaustive patching: what the search never spends past
        "cost_ceiling": None if math.isinf(search.ceiling) else search.ceiling,
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
        history=outcome.history,
        exhaustive_cost=n_pairs * (2.0 + float(search.weight.sum())),
        node_types=list(search.node_types),
        estimator=estimate_method,
        direction=search.job.direction,
        metric=search.job.pairs.metric_name,
        model_id=search.job.model.model_id,
        info={
            "stopped": "certified" if certified else outcome.stopped,
            "left": left,
            **({"fallback": outcome.fallback} if outcome.fallback else {}),
            **({"finish": outcome.finish} if outcome.finish else {}),
            **({"calibration": outcome.calibration.to_dict()} if outcome.calibration is not None else {}),
            **info,
            **graph,
        },
    )
