"""``Localization``: what ``atpstar.find`` found, the certificate that nothing else is as large, and its cost.

Shape letters: K nodes found, N nodes verified, P pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..bound import FalseNegativeBound
from ..cost import Cost
from ..persist import load_bundle, save_bundle
from ..persist import to_jsonable as _jsonable
from ..spaces import Spaces, spaces_from_info
from ..verify import Verification

KIND = "localization"
# Stages of the loop, in the order they first run; ``Localization.cost`` has one entry per stage.
STAGES: tuple[str, ...] = (
    "estimate",
    "verify_estimate_order",
    "bound",
    "calibrate",
    "verify_bound_order",
    "verify_rest",
)


@dataclass
class Localization:
    """Every node with |c(n)| >= theta, verified, and how sure we are that none is missing.

    Attributes:
        nodes: ``(node_type, index)`` of the verified nodes with |c(n)| >= theta, strongest first.
        effects: [K] c(n), the exact mean effect over the pairs, of each of ``nodes``.
        verified: every node patched exactly on the way (``Verification``; ``info["stage"]`` says by
            which stage), effects [N, P], in the order they were verified.
        bound: the last false-negative bound over the nodes left unverified (None if none ran: budget
            spent first). When every node was verified, a bound with ``n_unverified`` 0 and no assumption.
        certified: True when no node with |c(n)| >= theta is missing: every node was verified exactly
            (certified by exhaustion), or the last, calibrated bound's ``max_effect_upper`` < theta (with
            probability >= 1 - alpha under the stated assumption; see ``certificate``). False only when the user's
            ``budget`` cut the search short.
        theta, alpha: the effect size sought and the error rate of the certificate.
        cost: stage (``STAGES``) -> passes run by that stage.
        history: one row per round (dicts: round, stage, verified, found, n_unverified, samples, p,
            alpha_round, max_effect_upper, n_flagged, cost_fe, certified).
        exhaustive_cost: forward equivalents of patching every node on every pair (activation patching).
        node_types, estimator, direction, metric, model_id: what was searched and how.
        info: further facts (options, why the loop stopped, what is left).

    Example:
        >>> import atpstar
        >>> model = atpstar.load_model("toy-ioi")
        >>> pairs = atpstar.tasks.ioi(model.tokenizer, 4, seed=0).subset([0])
        >>> found = atpstar.find(model, pairs, 1.0, nodes=["head"])
        >>> found
        Localization(found=10, certified=True, theta=1, alpha=0.05, rounds=1, cost=92 fe)
        >>> found.certified_by, found.statement()[:86]
        ('exhaustion', '10 nodes have |c| >= 1; every node was verified exactly, so none is missing (certified')
        >>> sorted(found.certificate())
        ['alpha', 'assumption', 'calibration', 'certified', 'certified_by', 'cost_by_stage', 'cost_forward_equivalents', 'cost_fraction_of_exhaustive', 'fallback', 'final_bound', 'finish', 'left', 'n_found', 'n_verified', 'rounds', 'statement', 'stopped', 'theta']
    """

    nodes: list[tuple[str, tuple[int, ...]]]
    effects: torch.Tensor
    verified: Verification
    bound: FalseNegativeBound | None
    certified: bool
    theta: float
    alpha: float
    cost: dict[str, Cost]
    history: list[dict[str, Any]]
    exhaustive_cost: float
    node_types: list[str]
    estimator: str
    direction: str
    metric: str
    model_id: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def spaces(self) -> Spaces:
        """The node spaces of the search, rebuilt from ``info`` (they name the nodes without the model)."""
        return Spaces(spaces_from_info(self.info, self.node_types))

    @property
    def names(self) -> list[str]:
        """TransformerLens-style name of each found node (MIB's name for an edge)."""
        spaces = self.spaces
        return [spaces.name(t, index) for t, index in self.nodes]

    @property
    def total_cost(self) -> Cost:
        """Passes over all stages."""
        total = Cost()
        for stage_cost in self.cost.values():
            total = total + stage_cost
        return total

    @property
    def cost_fraction(self) -> float:
        """Total forward equivalents as a fraction of exhaustive activation patching."""
        return self.total_cost.forward_equivalents / self.exhaustive_cost if self.exhaustive_cost else float("nan")

    @property
    def rounds(self) -> int:
        """Bound rounds run (0 when none ran)."""
        return sum(1 for row in self.history if row["stage"] in ("bound", "verify_rest"))

    def certificate(self) -> dict[str, Any]:
        """The guarantee in numbers: theta, alpha, assumption, rounds, cost, the final bound, what is left."""
        bound = self.bound
        return {
            "certified": self.certified,
            "certified_by": self.certified_by,
            "theta": self.theta,
            "alpha": self.alpha,
            "statement": self.statement(),
            "assumption": bound.assumption if bound is not None else "no bound ran",
            "rounds": self.rounds,
            "cost_forward_equivalents": self.total_cost.forward_equivalents,
            "cost_fraction_of_exhaustive": self.cost_fraction,
            "cost_by_stage": {stage: c.forward_equivalents for stage, c in self.cost.items()},
            "n_found": len(self.nodes),
            "n_verified": self.verified.n_verified,
            "final_bound": None if bound is None else _bound_summary(bound),
            "stopped": self.info.get("stopped", ""),
            "fallback": self.info.get("fallback", ""),  # why every node was patched exhaustively, if it was
            "finish": self.info.get("finish", ""),  # why the loop verified the rest exactly, if it did
            "calibration": self.info.get("calibration"),  # what a bound's certificate rests on (None: no bound)
            "left": self.info.get("left", {}),
        }

    @property
    def certified_by(self) -> str | None:
        """``"exhaustion"`` (every node verified exactly: no assumption), ``"bound"`` (a calibrated bound covers
        the unverified nodes), or None when not certified."""
        if not self.certified:
            return None
        return "exhaustion" if self.bound is None or self.bound.n_unverified == 0 else "bound"

    def statement(self) -> str:
        """One sentence: what the certificate says (or why there is none)."""
        n = len(self.nodes)
        if self.certified_by == "exhaustion":
            why = self.info.get("finish") or self.info.get("fallback")
            because = f" (certified by exhaustion: {why})" if why else ""
            return (
                f"{n} nodes have |c| >= {self.theta:g}; every node was verified exactly, so none is missing{because}."
            )
        calibration = self.info.get("calibration")
        if self.certified and self.bound is not None and calibration is not None:
            return (
                f"{n} nodes have |c| >= {self.theta:g}; with confidence {1 - self.alpha:g} no other node does "
                f"(the {self.bound.n_unverified} unverified nodes have |c| <= {self.bound.max_effect_upper:.3g}: "
                f"the bound widened by {calibration['widen']:.3g} for the interaction shrinkage measured on "
                f"{calibration['checked']} nodes patched exactly, worst ratio |c|/U {calibration['worst_ratio']:.3g}; "
                "assuming the unchecked nodes shrink no more than the checked ones)."
            )
        if self.certified and self.bound is not None:
            return (
                f"{n} nodes have |c| >= {self.theta:g}; with confidence {1 - self.alpha:g} no other node does "
                f"(the {self.bound.n_unverified} unverified nodes have |c| <= {self.bound.max_effect_upper:.3g}, "
                "under the near-additivity assumption)."
            )
        left = self.info.get("left", {})
        return (
            f"NOT certified ({self.info.get('stopped', 'stopped early')}): {n} nodes with |c| >= {self.theta:g} "
            f"found so far; {left.get('n_unverified', '?')} nodes unverified, of which "
            f"{left.get('n_not_ruled_out', '?')} the last bound could not rule out"
            + (
                f" (its max |c| upper bound {left['max_effect_upper']:.3g})"
                if isinstance(left.get("max_effect_upper"), float)
                else ""
            )
            + "."
        )

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per found node, strongest first."""
        rows, spaces = [], self.spaces
        for rank, ((t, index), name, effect) in enumerate(zip(self.nodes, self.names, self.effects.tolist()), 1):
            rows.append({"rank": rank, "name": name, "node_type": t, **spaces.columns(t, index), "effect": effect})
        return rows

    def __str__(self) -> str:
        lines = [self.statement(), f"cost: {self.total_cost} ({self.cost_fraction:.1%} of exhaustive patching)"]
        lines += [f"  {row['rank']:>3}. {row['name']}: {row['effect']:+.4g}" for row in self.to_rows()[:20]]
        if self.bound is not None:
            lines.append(f"assumption: {self.bound.assumption}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"Localization(found={len(self.nodes)}, certified={self.certified}, theta={self.theta:g}, "
            f"alpha={self.alpha:g}, rounds={self.rounds}, cost={self.total_cost.forward_equivalents:.0f} fe)"
        )

    def save(self, path: str | Path) -> None:
        """Write ``path.safetensors`` (effects and bound tensors) and ``path.json`` (the rest), atomically.

        Args:
            path: file path without extension (a ``.json`` or ``.safetensors`` suffix is dropped).
        """
        base = _base_path(path)
        base.parent.mkdir(parents=True, exist_ok=True)
        verified_meta, verified_tensors = self.verified.to_parts()
        tensors = {"effects": self.effects.double().contiguous()}  # [K]
        tensors.update({f"verified/{k}": t.double().contiguous() for k, t in verified_tensors.items()})
        bound_meta = None
        if self.bound is not None:
            bound_meta, bound_tensors = self.bound.to_parts()
            tensors.update({f"bound/{k}": v for k, v in bound_tensors.items()})
        meta = {
            "nodes": [[t, list(index)] for t, index in self.nodes],
            "names": self.names,
            "certified": self.certified,
            "certificate": _jsonable(self.certificate()),
            "theta": self.theta,
            "alpha": self.alpha,
            "cost": {stage: c.to_dict() for stage, c in self.cost.items()},
            "history": _jsonable(self.history),
            "exhaustive_cost": self.exhaustive_cost,
            "node_types": self.node_types,
            "estimator": self.estimator,
            "direction": self.direction,
            "metric": self.metric,
            "model_id": self.model_id,
            "info": _jsonable(self.info),
            "verified": verified_meta,
            "bound": bound_meta,
        }
        # One bundle (persist): tensors first, then the JSON bound to them by id and hash, both atomic.
        save_bundle(base, KIND, meta, tensors)

    @classmethod
    def load(cls, path: str | Path) -> Localization:
        """Read a localization written by ``save`` (``path`` with or without ``.json``/``.safetensors``).

        Raises:
            InputError: no saved localization there; CorruptFileError (an InputError kind): one half
                missing, truncated or from another save.
        """
        meta, tensors = load_bundle(_base_path(path), KIND)
        # Files from before ``to_parts`` kept direction, metric and model id only at the top level.
        shared: dict[str, Any] = {k: meta[k] for k in ("direction", "metric", "model_id") if k in meta}
        verified = Verification.from_parts(
            {**shared, **meta["verified"]},
            {k[len("verified/") :]: v for k, v in tensors.items() if k.startswith("verified/")},
            _base_path(path),
        )
        bound = None
        if meta["bound"] is not None:
            bound = FalseNegativeBound.from_parts(
                meta["bound"], {k[6:]: v for k, v in tensors.items() if k.startswith("bound/")}
            )
        return cls(
            nodes=[(t, tuple(int(i) for i in index)) for t, index in meta["nodes"]],
            effects=tensors["effects"],
            verified=verified,
            bound=bound,
            certified=bool(meta["certified"]),
            theta=float(meta["theta"]),
            alpha=float(meta["alpha"]),
            cost={stage: Cost.from_dict(c) for stage, c in meta["cost"].items()},
            history=list(meta["history"]),
            exhaustive_cost=float(meta["exhaustive_cost"]),
            node_types=list(meta["node_types"]),
            estimator=meta["estimator"],
            direction=meta["direction"],
            metric=meta["metric"],
            model_id=meta["model_id"],
            info=meta["info"],
        )


def _bound_summary(bound: FalseNegativeBound) -> dict[str, Any]:
    return {
        "max_effect_upper": bound.max_effect_upper,
        "prob_upper": bound.prob_upper,
        "alpha_round": bound.alpha,
        "n_unverified": bound.n_unverified,
        "worst_node": bound.worst_name,
        "samples": bound.info.get("samples"),
        "p": bound.info.get("p"),
        "combine": bound.info.get("combine"),
    }


def _base_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
