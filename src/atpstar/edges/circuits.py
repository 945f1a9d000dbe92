"""Circuits from edge scores and MIB's faithfulness metrics.

A circuit of size k is the k edges with the largest score, signed or |score| (MIB's ``apply_topn``),
optionally pruned as MIB prunes (drop nodes with no incoming or no outgoing edge, and their edges;
``input`` and ``logits`` stay). Scores are MIB's (``edges.mib.mib_scores``, 0019): higher is more important.

Faithfulness of a circuit C: f(C) = (m(C) - m(∅)) / (m(M) - m(∅)), m the metric averaged over the pairs,
m(M) the base run, m(∅) every edge patched to its source value, m(C) the edges outside C patched. Over
circuit sizes k = ⌊fraction · N⌋ at ``MIB_FRACTIONS`` (x, linear scale as MIB's default):
    CPR = Σ_i (x_{i+1} - x_i) (f_i + f_{i+1}) / 2            (circuits ranked by signed score; higher is better)
    CMD = Σ_i (x_{i+1} - x_i) (|1 - f_i| + |1 - f_{i+1}|) / 2  (circuits ranked by |score|; lower is better)
as MIB's leaderboard (its evaluation with ``absolute=False`` and ``absolute=True``).

Shape letters: P pairs, S senders, R receivers, N edges, K circuit sizes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..batching import plan_batch
from ..cost import Cost
from ..errors import InputError
from ..fingerprint import check_reuse
from ..model import as_model
from ..pairs import PromptPairs, check_direction
from ..pairsets import as_pairs
from ..persist import write_text
from ..progress import progress_bar
from ..validate import check_pairs_fit
from .circuit_run import circuit_bytes, circuit_metric
from .circuit_select import circuit_nodes as circuit_nodes  # re-exported: circuits are chosen there
from .circuit_select import prune_circuit as prune_circuit
from .circuit_select import receiver_owner as receiver_owner
from .circuit_select import top_edges
from .graph import EdgeGraph, graph_of
from .patching import prepare_edges

# MIB's circuit sizes, as fractions of all edges.
MIB_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass
class FaithfulnessCurve:
    """f at each circuit size for both of MIB's rankings, and MIB's areas.

    Attributes:
        fractions: circuit sizes as fractions of all edges (x axis).
        n_edges: edges kept at each size, circuits ranked by signed score (after pruning, when pruned).
        faithfulness: f at each size, circuits ranked by signed score (the CPR curve).
        metric_circuit: m(C) at each size of that ranking (mean over pairs).
        metric_full, metric_empty: m(M) and m(∅) (means over pairs).
        cpr: area under ``faithfulness`` (trapezoids over ``fractions``).
        cmd: area between ``faithfulness_abs`` and 1.
        method: the scores' method id; cost: passes spent on the curve.
        n_edges_abs, faithfulness_abs, metric_circuit_abs: the same for circuits ranked by |score|
            (the CMD curve).

    Example:
        >>> import atpstar
        >>> model = atpstar.load_model("toy-ioi")
        >>> pairs = atpstar.tasks.ioi(model.tokenizer, 4, seed=0)
        >>> result = atpstar.attribute(model, pairs, method="atp", nodes=["edge"])
        >>> curve = atpstar.faithfulness_curve(model, pairs, result, fractions=[0.1, 0.5, 1.0])
        >>> curve.n_edges, [round(f, 3) for f in curve.faithfulness]
        ([5, 45, 102], [0.121, 0.693, 1.0])
    """

    fractions: list[float]
    n_edges: list[int]
    faithfulness: list[float]
    metric_circuit: list[float]
    metric_full: float
    metric_empty: float
    cpr: float
    cmd: float
    method: str = ""
    cost: dict[str, float] = field(default_factory=dict)
    n_edges_abs: list[int] = field(default_factory=list)
    faithfulness_abs: list[float] = field(default_factory=list)
    metric_circuit_abs: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> FaithfulnessCurve:
        return cls(**json.loads(Path(path).read_text()))


def _edge_scores(scores: Any, graph: EdgeGraph) -> tuple[torch.Tensor, str]:
    """([N] MIB-signed edge scores in edge order, method id or "") of an ``Attribution``, a ``MibCircuit``
    or a tensor (taken as MIB scores: higher is more important)."""
    circuit_graph = getattr(scores, "graph", None)
    if isinstance(circuit_graph, EdgeGraph):  # a MIB circuit file (``load_mib``): scores in edge order
        if circuit_graph != graph:
            raise InputError(
                f"the MIB circuit is for {_graph_text(circuit_graph)}, but the model has {_graph_text(graph)}; "
                "use the circuit file made for this model"
            )
        return torch.as_tensor(scores.scores), ""
    if hasattr(scores, "per_pair"):  # an Attribution: ranked by MIB's sign, -mean effect (noising)
        return signed_importance(scores), scores.method
    try:
        return torch.as_tensor(scores), ""
    except (TypeError, ValueError, RuntimeError) as err:
        raise InputError(
            f"scores must be an Attribution with edges, a MIB circuit (load_mib) or a tensor of edge scores; "
            f"got {type(scores).__name__}"
        ) from err


def signed_importance(result: Any) -> torch.Tensor:
    """[N] -mean over pairs of a noising result's edge effects (+mean for denoising): MIB's ranking, unscaled."""
    return signed_mean(result, allow_denoising=True) * (1.0 if result.direction == "denoising" else -1.0)


SIGN = "sign/edge"  # the extra of edge GradDrop results: int8 [P, N], the sign of the estimate before GradDrop


def signed_mean(result: Any, sizes: torch.Tensor | None = None, allow_denoising: bool = False) -> torch.Tensor:
    """[N] (1/P) Σ_i ŝ_i / b(i) of a result's edges (``sizes`` [P] the b(i); None: 1), in the effect's sign.

    GradDrop's per-pair scores g_i are magnitudes. Their mean m = (1/P) Σ_i g_i / b(i) is kept as the size and
    given the sign of (1/P) Σ_i σ_i g_i / b(i), σ_i the sign of pair i's estimate before GradDrop (the QK-fixed
    AtP for ``atp*``; ``extras["sign/edge"]``); where that is 0 the magnitude keeps its + sign. So |score| (the
    |score| ranking, CMD) is GradDrop's, and the signed ranking (CPR) has a sign (design record 0029).

    Raises:
        InputError: a GradDrop result without the sign (made by an older version): rerun the method.
    """
    per_pair = edge_per_pair(result, allow_denoising)
    if sizes is not None:
        per_pair = per_pair / sizes[:, None]  # [P, N]
    mean = per_pair.mean(0)
    if not result.options.get("grad_drop"):
        return mean
    if SIGN not in result.extras:
        raise InputError(
            f"this {result.method} result holds GradDrop magnitudes without their sign (it was made by an older "
            "atpstar), so MIB's signed ranking cannot be formed; rerun the method (delete a saved result first)"
        )
    signed = (per_pair * result.extras[SIGN].double()).mean(0)
    return torch.where(signed < 0, -mean, mean)


def edge_per_pair(result: Any, allow_denoising: bool = False) -> torch.Tensor:
    """[P, N] float64 position-summed edge effects of an ``Attribution`` (noising unless ``allow_denoising``)."""
    if "edge" not in getattr(result, "per_pair", {}):
        raise InputError("the attribution has no edge scores; run attribute(..., nodes=['edge'])")
    per_pair = torch.as_tensor(result.per_pair["edge"]).double()
    if per_pair.ndim != 2:
        raise InputError(
            "MIB's circuit files hold position-summed edges; this attribution is position-resolved "
            "(edge_positions=True). Run the method without edge_positions to export to MIB"
        )
    if result.direction != "noising" and not allow_denoising:
        raise InputError(
            f"MIB's scores patch the clean run with counterfactual values (noising); this result is "
            f"{result.direction}: run the method with direction='noising'"
        )
    return per_pair


def _graph_text(graph: EdgeGraph) -> str:
    layout = "parallel" if graph.parallel else "sequential"
    return f"{graph.n_layers} layers x {graph.n_heads} heads ({layout} attention/MLP)"


def areas(fractions: Sequence[float], faithfulness: Sequence[float]) -> tuple[float, float]:
    """(area under f, area between f and 1): MIB's ``area_under`` and ``area_from_1`` (trapezoids over
    ``fractions``). MIB's CPR is the first of the signed ranking's curve, its CMD the second of the
    |score| ranking's."""
    cpr = cmd = 0.0
    for i in range(len(fractions) - 1):
        width = fractions[i + 1] - fractions[i]
        cpr += width * (faithfulness[i] + faithfulness[i + 1]) / 2
        cmd += width * (abs(1 - faithfulness[i]) + abs(1 - faithfulness[i + 1])) / 2
    return cpr, cmd


def check_fractions(fractions: Sequence[Any], what: str = "fractions") -> list[float]:
    """``fractions`` as floats after checking they are circuit sizes: finite, in [0, 1], increasing.

    Args:
        what: how the message names them (``"--fractions"`` on the command line).

    Raises:
        InputError: none given, a value that is not a number, NaN, infinite, outside [0, 1], or out of order.
    """
    try:
        values = [float(x) for x in fractions]
    except (TypeError, ValueError) as err:
        raise InputError(f"{what} must be numbers in [0, 1]; got {list(fractions)!r}") from err
    # NaN fails every comparison, so the range test refuses it with the infinities.
    if not values or any(not 0 <= x <= 1 for x in values) or values != sorted(values):
        raise InputError(f"{what} must be increasing finite values in [0, 1] (e.g. 0.01,0.1,1); got {values}")
    return values


def faithfulness_curve(
    model: Any,
    pairs: PromptPairs,
    scores: Any,
    fractions: Sequence[float] = MIB_FRACTIONS,
    *,
    direction: str = "noising",
    prune: bool = True,
    batch_size: int | None = None,
    memory_gb: float = 1.0,
    progress: bool = False,
    convention: str | None = None,
) -> FaithfulnessCurve:
    """MIB's faithfulness curves of the circuits that edge ``scores`` pick, and its CPR and CMD.

    Circuits are ranked twice, by signed score (CPR) and by |score| (CMD), as MIB's leaderboard does;
    a circuit both rankings share is run once.

    Args:
        model: an ``atpstar.Model`` or a ``transformers`` causal LM.
        pairs: the prompt pairs the circuits are evaluated on (a ``PairSet``: group by group).
        scores: an ``Attribution`` with edges (ranked by MIB's score, ``signed_importance``:
            -mean effect for noising), a MIB circuit file read by ``load_mib`` (its scores; its graph must
            be the model's), or a tensor [N] of edge scores in MIB's sign (higher is more important).
        fractions: circuit sizes as fractions of all edges, increasing (MIB's by default).
        direction: ``"noising"`` (edges outside the circuit get noise values) or ``"denoising"``.
        prune: prune circuits as MIB does.
        batch_size: circuit forwards per batch (pairs x sizes); None picks it from ``memory_gb``.
        convention: how absent head edges reach their receivers on a post-norm model (0019): ``"mib"``
            (through the norm, as MIB evaluates) or ``"atpstar"``; None: the attribution's, else ``"mib"``.

    Example:
        >>> import atpstar
        >>> model = atpstar.load_model("toy-ioi")
        >>> pairs = atpstar.tasks.ioi(model.tokenizer, 4, seed=0)
        >>> result = atpstar.attribute(model, pairs, method="atp+ig", nodes=["edge"], ig_steps=5)
        >>> curve = atpstar.faithfulness_curve(model, pairs, result)
        >>> round(curve.cpr, 3), round(curve.cmd, 3)
        (0.795, 0.233)
    """
    model = as_model(model)
    pairs = as_pairs(pairs)
    check_direction(direction)
    check_pairs_fit(model, pairs)
    if hasattr(scores, "per_pair"):  # an Attribution: made on this model and these pairs
        fix = "Draw the curve with the model, tokenizer, prompt pairs and metric the estimate was made with."
        check_reuse(scores, model, pairs, f"estimate ({scores.method})", fix)
    graph = graph_of(model, _curve_convention(scores, convention))
    scores, method = _edge_scores(scores, graph)
    if scores.shape != (graph.n_edges,):
        raise InputError(
            f"faithfulness needs one score per edge ({graph.n_edges}); got shape {tuple(scores.shape)}. MIB's "
            "circuits are position-summed: run the method without edge_positions=True"
        )
    fractions = check_fractions(fractions)
    sizes = [int(x * graph.n_edges) for x in fractions]
    circuits = {rank: [top_edges(graph, scores, k, prune, absolute=rank) for k in sizes] for rank in (False, True)}
    cost = Cost()
    means = _circuit_means(
        model, pairs, graph, circuits[False] + circuits[True], direction, cost, batch_size, memory_gb, progress
    )
    full, empty = means[0], means[1]
    if abs(full - empty) < 1e-12 * max(1.0, abs(full)):
        raise InputError(
            f"m(M) = m(∅) = {full:.4g}: the metric does not change between base and source runs, so "
            "faithfulness is undefined; check the pairs"
        )
    signed, absolute = means[2 : 2 + len(sizes)], means[2 + len(sizes) :]
    faithfulness = [(m - empty) / (full - empty) for m in signed]
    faithfulness_abs = [(m - empty) / (full - empty) for m in absolute]
    return FaithfulnessCurve(
        fractions=fractions,
        n_edges=[int(c.sum()) for c in circuits[False]],
        faithfulness=faithfulness,
        metric_circuit=signed,
        metric_full=full,
        metric_empty=empty,
        cpr=areas(fractions, faithfulness)[0],
        cmd=areas(fractions, faithfulness_abs)[1],
        method=method,
        cost=cost.to_dict(),
        n_edges_abs=[int(c.sum()) for c in circuits[True]],
        faithfulness_abs=faithfulness_abs,
        metric_circuit_abs=absolute,
    )


def circuit_metrics(
    model: Any,
    pairs: PromptPairs,
    circuits: Sequence[torch.Tensor],
    *,
    direction: str = "noising",
    convention: str = "mib",
    batch_size: int | None = None,
    memory_gb: float = 1.0,
    progress: bool = False,
) -> tuple[float, float, list[float], Cost]:
    """(m(M), m(∅), [m(C) per circuit], cost) for given circuits (bool [N] each, used as they are).

    MIB's evaluation of a submission of circuit files (``evaluate_area_under_curve_multifile``) runs this on
    each circuit after MIB's pruning (``prune_circuit``).
    """
    model = as_model(model)
    check_direction(direction)
    check_pairs_fit(model, pairs)
    graph = graph_of(model, convention)
    for chosen in circuits:
        if tuple(chosen.shape) != (graph.n_edges,):
            raise InputError(f"a circuit needs one flag per edge ({graph.n_edges}); got shape {tuple(chosen.shape)}")
    cost = Cost()
    means = _circuit_means(model, pairs, graph, list(circuits), direction, cost, batch_size, memory_gb, progress)
    return means[0], means[1], means[2:], cost


def _curve_convention(scores: Any, convention: str | None) -> str:
    """The head-sender convention of a curve: the one asked for, else the attribution's, else MIB's."""
    if convention is not None:
        return convention
    made = scores.edge_graph().convention if hasattr(scores, "per_pair") else None
    return made or "mib"


def _circuit_means(
    model: Any,
    pairs: PromptPairs,
    graph: EdgeGraph,
    circuits: list[torch.Tensor],
    direction: str,
    cost: Cost,
    batch_size: int | None,
    memory_gb: float,
    progress: bool,
) -> list[float]:
    """[m(M), m(∅), m(C) for each circuit]: metric means over the pairs, each distinct circuit run once
    (a ``PairSet``: group by group, the means over all its pairs)."""
    valid = graph.valid
    masks = [torch.zeros_like(valid), valid]  # m(M): nothing absent; m(∅): every edge absent
    slot: dict[bytes, int] = {}
    order = [0, 1]
    for chosen in circuits:
        key = chosen.numpy().tobytes()
        if key not in slot:
            slot[key] = len(masks)
            masks.append(valid & ~graph.to_matrix(chosen.to(torch.float64)).bool())
        order.append(slot[key])
    batch = plan_batch(circuit_bytes(model, graph, pairs.seq_len), memory_gb, model.device, batch_size=batch_size)
    with progress_bar(len(masks) * pairs.n_pairs, "faithfulness", progress, unit="forward") as bar:
        parts = [_circuit_values(model, group, graph, masks, direction, cost, batch, bar.update) for group in pairs.groups]
    means = pairs.gather(parts, dim=1).mean(1)  # [C, P] -> [C]
    return [float(means[i]) for i in order]


def _circuit_values(
    model: Any,
    pairs: PromptPairs,
    graph: EdgeGraph,
    masks: list[torch.Tensor],
    direction: str,
    cost: Cost,
    batch: int,
    advance: Any,
) -> torch.Tensor:
    """m(C) [C, P] float64 of each absent-edge mask on each pair of one equal-length group."""
    cache = prepare_edges(model, graph, pairs, direction, cost)
    source = (cache.base_senders + cache.delta).contiguous()
    jobs = [(c, p) for c in range(len(masks)) for p in range(pairs.n_pairs)]
    values = torch.zeros(len(masks), pairs.n_pairs, dtype=torch.float64)
    for start in range(0, len(jobs), batch):
        part = jobs[start : start + batch]
        circuit_i = torch.tensor([c for c, _ in part])
        pair_i = torch.tensor([p for _, p in part])
        absent = torch.stack([masks[c] for c in circuit_i.tolist()])  # [B, S, R]
        values[circuit_i, pair_i] = circuit_metric(model, cache, source, pair_i, absent, cost).double().cpu()
        advance(len(part))
    return values
