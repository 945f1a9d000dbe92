"""MIB's evaluation of a submission folder: counterfactual patching of the edges outside each circuit.

A folder holding one score file is evaluated as ``evaluate_area_under_curve`` does: circuits of
⌊fraction · N⌋ edges at MIB's ten fractions, pruned, ranked by signed score (``absolute=False``, its
``area_under`` is the CPR) and by |score| (``absolute=True``, its ``area_from_1`` is the CMD). A folder
of circuit files is evaluated as ``evaluate_area_under_curve_multifile`` does: each circuit as it is
(pruned), sorted by edge count, then (every edge, f = 1), over the same fractions. Every m is the mean
logit difference over the pairs; f = (m(C) - m(∅)) / (m(M) - m(∅)).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..edges.circuits import MIB_FRACTIONS, FaithfulnessCurve, areas, circuit_metrics, faithfulness_curve, prune_circuit
from ..edges.graph import graph_of
from ..edges.mib import load_mib
from ..errors import InputError


@dataclass
class MibResult:
    """What MIB's evaluation writes for one ranking (its ``.pkl`` keys).

    Attributes:
        weighted_edge_counts: edges of each circuit.
        area_under, area_from_1: trapezoid areas under f and between f and 1.
        average: mean of f.
        faithfulnesses: f of each circuit.
    """

    weighted_edge_counts: list[int]
    area_under: float
    area_from_1: float
    average: float
    faithfulnesses: list[float]

    @classmethod
    def of(cls, counts: list[int], faithfulness: list[float]) -> MibResult:
        under, from_1 = areas(MIB_FRACTIONS, faithfulness)
        return cls(counts, under, from_1, sum(faithfulness) / len(faithfulness), faithfulness)


@dataclass
class MibScores:
    """CPR (area under, signed ranking) and CMD (area from 1, |score| ranking) of one task-model pair.

    Attributes:
        signed, absolute: MIB's results with ``absolute=False`` and ``absolute=True``.
        cost: passes spent.
        curve: the faithfulness curve (score-file submissions), else None.
        cpr, cmd: MIB's two scores.
    """

    signed: MibResult
    absolute: MibResult
    cost: dict[str, float] = field(default_factory=dict)
    curve: FaithfulnessCurve | None = None
    cpr: float = field(init=False)  # the signed ranking's area under f
    cmd: float = field(init=False)  # the |score| ranking's area between f and 1

    def __post_init__(self) -> None:
        self.cpr, self.cmd = self.signed.area_under, self.absolute.area_from_1

    def to_dict(self) -> dict[str, Any]:
        out = {"cpr": self.cpr, "cmd": self.cmd, "signed": asdict(self.signed), "absolute": asdict(self.absolute)}
        return {**out, "cost": self.cost}


def files_in(folder: Path) -> list[Path]:
    """The circuit files of a task-model folder (``.json``/``.pt``), refusing anything else."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    bad = [p.name for p in files if p.suffix not in (".json", ".pt")]
    if bad or not files:
        raise InputError(f"{folder} must hold one score file or circuit files (.json/.pt); found {bad or 'nothing'}")
    return files


def evaluate_folder(model: Any, pairs: Any, folder: Path, **options: Any) -> tuple[MibScores | None, MibResult | None]:
    """(both rankings of a score file, or None; the circuits' result, or None) for one task-model folder."""
    files = files_in(folder)
    if len(files) == 1:
        circuit = load_mib(files[0])
        curve = faithfulness_curve(model, pairs, circuit, MIB_FRACTIONS, convention="mib", **options)
        signed = MibResult.of(curve.n_edges, curve.faithfulness)
        absolute = MibResult.of(curve.n_edges_abs, curve.faithfulness_abs)
        return MibScores(signed, absolute, curve.cost, curve), None
    return None, _multifile(model, pairs, files[:9], **options)


def _multifile(model: Any, pairs: Any, files: list[Path], **options: Any) -> MibResult:
    graph = graph_of(model)
    circuits = []
    for path in files:
        circuit = load_mib(path)
        if circuit.graph != graph:
            raise InputError(f"{path} is for another graph than the model's ({graph.n_edges} edges)")
        circuits.append(prune_circuit(graph, circuit.in_graph))
    full, empty, means, _ = circuit_metrics(model, pairs, circuits, convention="mib", **options)
    if abs(full - empty) < 1e-12 * max(1.0, abs(full)):
        raise InputError("m(M) = m(∅): the metric does not change between clean and counterfactual runs")
    points = sorted((int(c.sum()), (m - empty) / (full - empty)) for c, m in zip(circuits, means))
    counts = [c for c, _ in points] + [graph.n_edges]
    return MibResult.of(counts, [f for _, f in points] + [1.0])


def evaluate_submission(model: Any, pairs: Any, folders: dict[bool | None, Path], **options: Any) -> MibScores:
    """CPR and CMD of a task-model pair from its folders (``submission.submission_folders``).

    Args:
        options: ``batch_size``, ``memory_gb``, ``progress`` of the circuit forwards.
    """
    results: dict[bool, MibResult] = {}
    curve, cost = None, {}
    for absolute, folder in folders.items():
        scores, multifile = evaluate_folder(model, pairs, folder, **options)
        if scores is not None:
            results.setdefault(False, scores.signed)
            results.setdefault(True, scores.absolute)
            curve, cost = scores.curve, scores.cost
        elif multifile is not None:
            for key in (False, True) if absolute is None else (absolute,):
                results[key] = multifile
    if set(results) != {False, True}:
        raise InputError("a circuit submission needs both rankings (abs-False and abs-True folders)")
    return MibScores(results[False], results[True], cost, curve)
