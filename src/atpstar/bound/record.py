"""``FalseNegativeBound``: how large an effect could still hide among the unverified nodes, and what it assumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..cost import Cost
from ..errors import InputError
from ..persist import to_jsonable
from ..spaces import Spaces, spaces_from_info

ASSUMPTION = (
    "Assumes node effects are close to additive: the bound is about the quantity Subsampling estimates, "
    "mean_in - mean_out over random joint patches of the unverified nodes, which equals each node's "
    "single-node effect c(n) (mean over these prompt pairs) only when effects add up; interactions "
    "between nodes can hide effects the bound does not see. Welch intervals also assume near-normal "
    "sample means."
)


@dataclass
class FalseNegativeBound:
    """How large an effect could still hide among the unverified nodes.

    Attributes:
        max_effect_upper: (1 - alpha) upper confidence bound on max |c(n)| over unverified nodes
            (inf when some node had fewer than 2 samples in or out on some pair; 0 when none is left).
        prob_upper: upper bound on the probability that some unverified node has |c(n)| >= theta
            (nan when theta is None).
        theta: the effect size of ``prob_upper``.
        alpha: confidence level of ``max_effect_upper``.
        n_unverified: number of nodes the bound covers.
        worst_node: ``(node_type, index)`` attaining ``max_effect_upper`` (None when none is left).
        assumption: the assumption the bound rests on (say it with the numbers).
        cost: passes run (the Subsampling over unverified nodes).
        estimate, upper: node type -> [*layout] ĉ(n) and its upper bound on |c(n)| (nan at verified nodes).
        se: node type -> [*layout] standard error of ĉ(n) (nan at verified nodes; empty in bounds saved
            before it was recorded).
        direction: ``"noising"`` or ``"denoising"``.

    Example:
        >>> import atpstar
        >>> model = atpstar.load_model("toy-ioi")
        >>> pairs = atpstar.tasks.ioi(model.tokenizer, 4, seed=0)
        >>> checked = atpstar.verify(model, pairs, atpstar.attribute(model, pairs, "atp+qkfix", nodes=["head"]), budget=10)
        >>> bound = atpstar.false_negative_bound(model, pairs, checked, theta=1.0, samples=256)
        >>> bound.worst_name, bound.assumption[:47]
        ('blocks.0.attn.hook_z[pos 1, head 2]', 'Assumes node effects are close to additive: the')
    """

    max_effect_upper: float
    prob_upper: float
    theta: float | None
    alpha: float
    n_unverified: int
    worst_node: tuple[str, tuple[int, ...]] | None
    assumption: str
    cost: Cost
    direction: str
    estimate: dict[str, torch.Tensor] = field(default_factory=dict)
    upper: dict[str, torch.Tensor] = field(default_factory=dict)
    se: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def worst_name(self) -> str | None:
        """Name of ``worst_node``, as its node space names it (an edge's MIB name needs ``info["edge_graph"]``)."""
        if self.worst_node is None:
            return None
        node_type, index = self.worst_node
        try:
            return Spaces(spaces_from_info(self.info, [node_type])).name(node_type, index)
        except InputError:  # a bound kept without what names its nodes (an edge bound without its graph)
            return f"{node_type} {' '.join(str(i) for i in index)}"

    def __str__(self) -> str:
        worst = "" if self.worst_node is None else f" (at {self.worst_name})"
        prob = "" if self.theta is None else f"; P(some unverified |c| >= {self.theta:g}) <= {self.prob_upper:.3g}"
        return (
            f"{self.n_unverified} unverified nodes ({self.direction}): max |c| <= {self.max_effect_upper:.4g} "
            f"with confidence {1 - self.alpha:g}{worst}{prob}. {self.assumption}"
        )

    def to_parts(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON-ready facts, tensors ``estimate/{t}``, ``upper/{t}``); ``from_parts`` inverts it."""
        tensors = {f"estimate/{t}": x.double().contiguous() for t, x in self.estimate.items()}
        tensors.update({f"upper/{t}": x.double().contiguous() for t, x in self.upper.items()})
        tensors.update({f"se/{t}": x.double().contiguous() for t, x in self.se.items()})
        meta = {
            "max_effect_upper": self.max_effect_upper,
            "prob_upper": self.prob_upper,
            "theta": self.theta,
            "alpha": self.alpha,
            "n_unverified": self.n_unverified,
            "worst_node": None if self.worst_node is None else [self.worst_node[0], list(self.worst_node[1])],
            "assumption": self.assumption,
            "cost": self.cost.to_dict(),
            "direction": self.direction,
            "info": to_jsonable(self.info),
        }
        return meta, tensors

    @classmethod
    def from_parts(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> FalseNegativeBound:
        """The bound ``to_parts`` split (non-finite numbers may come back from JSON as strings)."""
        worst = meta["worst_node"]
        return cls(
            max_effect_upper=float(meta["max_effect_upper"]),
            prob_upper=float(meta["prob_upper"]),
            theta=None if meta["theta"] is None else float(meta["theta"]),
            alpha=float(meta["alpha"]),
            n_unverified=int(meta["n_unverified"]),
            worst_node=None if worst is None else (worst[0], tuple(int(i) for i in worst[1])),
            assumption=meta["assumption"],
            cost=Cost.from_dict(meta["cost"]),
            direction=meta["direction"],
            estimate={k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("estimate/")},
            upper={k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("upper/")},
            se={k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("se/")},
            info=meta["info"],
        )
