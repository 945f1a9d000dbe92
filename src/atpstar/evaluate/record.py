"""``Evaluation``: cost-of-verified-recall curves of several estimators against one ground truth, with
their renderings (rows, markdown, CSV, dict) and JSON persistence. ``atpstar.evaluate`` computes them.

Shape letters: K ranks 1..K_max.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptFileError
from ..persist import load_json, save_json

KIND = "evaluation"


@dataclass
class MethodCurve:
    """One method's cost-of-verified-recall curve in one setting.

    Attributes:
        method: the curve's label: the method id, with the options that tell it apart when several
            estimates of one method are compared (``evaluate.harness.labels``).
        forward, backward: the method's own passes (total over all pairs).
        own_cost: own cost in forward equivalents charged to each ranking problem (per pair: total / P).
        cost: [K] cost of verified recall (per-pair setting: geometric mean over pairs).
        recall: [K] recall of the true top-K within the estimated top-K (per pair: mean over pairs).
        cost_min, cost_q25, cost_q75, cost_max: [K] spread over pairs (per-pair setting only).
        options: the method's options.
    """

    method: str
    forward: float
    backward: float
    own_cost: float
    cost: np.ndarray
    recall: np.ndarray
    cost_min: np.ndarray | None = None
    cost_q25: np.ndarray | None = None
    cost_q75: np.ndarray | None = None
    cost_max: np.ndarray | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def verifications(self) -> np.ndarray:
        """[K] cost minus the method's own cost: patching forwards spent verifying."""
        return self.cost - self.own_cost


@dataclass
class Evaluation:
    """Cost-of-verified-recall curves of several methods against one exhaustive ground truth.

    Attributes:
        setting: ``"distribution"`` or ``"per_pair"``.
        k: [K] the ranks 1..K_max.
        curves: label (the method id, or with its telling options) -> ``MethodCurve``.
        node_types, n_nodes, n_pairs, model_id, metric, direction: what was compared.
        truth_cost: forward equivalents of the exhaustive ground truth (over all pairs).
        verification: ``"forward"`` (a verification costs one forward per pair) or ``"partial"``
            ((L - l) / L of a forward per pair for a node at layer l).
        oracle: [K] cost of verifying exactly the true top-K (``k`` x P forwards in the distribution
            setting, ``k`` per pair; per pair with ``"partial"``: geometric mean over pairs).

    Example:
        >>> import atpstar
        >>> model = atpstar.load_model("toy-ioi")
        >>> pairs = atpstar.tasks.ioi(model.tokenizer, 4, seed=0)
        >>> truth = atpstar.attribute(model, pairs, "activation_patching", nodes=["key"])
        >>> table = atpstar.evaluate(truth, [atpstar.attribute(model, pairs, "atp", nodes=["key"])])
        >>> round(table.relative_cost("atp"), 2)
        4.49
        >>> print(table.to_markdown())
        | method | forward | backward | own_cost | cost@1 | cost@10 | cost@34 | recall@1 | recall@10 | recall@34 | cost/oracle |
        |---|---|---|---|---|---|---|---|---|---|---|
        | atp | 8 | 4 | 16 | 32 | 236 | 236 | 0 | 0.4 | 0.912 | 4.49 |
    """

    setting: str
    k: np.ndarray
    curves: dict[str, MethodCurve]
    node_types: list[str]
    n_nodes: int
    n_pairs: int
    model_id: str
    metric: str
    direction: str
    truth_cost: float
    verification: str = "forward"
    oracle: np.ndarray | None = None

    def oracle_cost(self) -> np.ndarray:
        """[K] cost of verifying exactly the true top-K (see ``oracle``)."""
        if self.oracle is not None:
            return self.oracle
        return self.k * (self.n_pairs if self.setting == "distribution" else 1.0)

    @property
    def k_max(self) -> int:
        return int(self.k[-1])

    def report_ks(self, count: int = 5) -> list[int]:
        """A few log-spaced K values for tables (1, 10, 100, ..., K_max)."""
        ks = sorted({1, *(10**i for i in range(1, 7) if 10**i < self.k_max), self.k_max})
        return ks if len(ks) <= count else [*ks[: count - 1], self.k_max]

    def relative_cost(self, method: str) -> float:
        """Geometric mean over log-spaced K of cost(K) / oracle(K): one number per method, lower is better."""
        curve = self.curves[method]
        ks = np.unique(np.round(np.logspace(0, math.log10(self.k_max), 25)).astype(int))
        return float(np.exp(np.mean(np.log(curve.cost[ks - 1] / self.oracle_cost()[ks - 1]))))

    def ranking(self) -> list[str]:
        """Method ids from cheapest to most expensive by ``relative_cost``."""
        return sorted(self.curves, key=self.relative_cost)

    def to_rows(self, ks: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """One row per method: own passes, cost and recall at a few K, relative cost to the oracle."""
        ks = list(ks) if ks is not None else self.report_ks()
        rows = []
        for method in self.ranking():
            curve = self.curves[method]
            row: dict[str, Any] = {
                "method": method,
                "forward": round(curve.forward, 2),
                "backward": round(curve.backward, 2),
                "own_cost": round(curve.own_cost, 2),
            }
            for k in ks:
                row[f"cost@{k}"] = round(float(curve.cost[k - 1]), 1)
            for k in ks:
                row[f"recall@{k}"] = round(float(curve.recall[k - 1]), 3)
            row["cost/oracle"] = round(self.relative_cost(method), 2)
            rows.append(row)
        return rows

    def to_markdown(self, ks: Sequence[int] | None = None) -> str:
        rows = self.to_rows(ks)
        if not rows:
            return ""
        header = list(rows[0])
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_fmt(row[h]) for h in header) + " |" for row in rows]
        return "\n".join(lines)

    def to_csv(self, path: str | Path, ks: Sequence[int] | None = None) -> None:
        import csv

        from ..persist import atomic_path

        rows = self.to_rows(ks)
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["method"])
            writer.writeheader()
            writer.writerows(rows)

    def to_dict(self) -> dict[str, Any]:
        curves = {}
        for method, curve in self.curves.items():
            data: dict[str, Any] = {
                "forward": curve.forward,
                "backward": curve.backward,
                "own_cost": curve.own_cost,
                "options": curve.options,
            }
            for name in ("cost", "recall", "cost_min", "cost_q25", "cost_q75", "cost_max"):
                value = getattr(curve, name)
                data[name] = None if value is None else [float(v) for v in value]
            curves[method] = data
        return {
            "setting": self.setting,
            "k_max": self.k_max,
            "node_types": self.node_types,
            "n_nodes": self.n_nodes,
            "n_pairs": self.n_pairs,
            "model_id": self.model_id,
            "metric": self.metric,
            "direction": self.direction,
            "truth_cost": self.truth_cost,
            "verification": self.verification,
            "oracle": [float(v) for v in self.oracle_cost()],
            "curves": curves,
        }

    def save(self, path: str | Path) -> None:
        """Write the evaluation as JSON (``path``, ``.json`` added if missing), atomically."""
        path = Path(path)
        save_json(path if path.suffix == ".json" else Path(str(path) + ".json"), KIND, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Evaluation:
        """Read an evaluation written by ``save``.

        Raises:
            InputError: no such file. CorruptFileError: truncated, another kind, another format version.
        """
        path = Path(path)
        data = load_json(path if path.suffix == ".json" else Path(str(path) + ".json"), KIND)
        try:
            return cls._from_dict(data)
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptFileError(f"{path}: saved evaluation is incomplete ({err!r})") from err

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> Evaluation:
        curves = {}
        for method, c in data["curves"].items():
            arrays = {
                name: None if c[name] is None else np.asarray(c[name], dtype=float)
                for name in ("cost", "recall", "cost_min", "cost_q25", "cost_q75", "cost_max")
            }
            curves[method] = MethodCurve(
                method,
                c["forward"],
                c["backward"],
                c["own_cost"],
                options=c["options"],
                **arrays,  # type: ignore[arg-type]
            )
        return cls(
            data["setting"],
            np.arange(1, data["k_max"] + 1),
            curves,
            data["node_types"],
            data["n_nodes"],
            data["n_pairs"],
            data["model_id"],
            data["metric"],
            data["direction"],
            data["truth_cost"],
            data["verification"],
            np.asarray(data["oracle"], dtype=float),
        )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
