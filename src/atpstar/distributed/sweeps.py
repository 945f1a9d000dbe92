"""Sweeps as work units: plan the units, run them (resuming from unit checkpoints), merge the results.

Merged results equal the in-process ones: exact patching and verification compute each (node, pair)
effect independently, so only the batch a forward shares differs (float rounding); Subsampling's
element ranges follow the in-process batches where they can and their Welford statistics merge
exactly (``ops.welford_merge``); blocks are patched one block per forward either way. The cost is the
sum of the units' costs plus the base/source runs each worker needed (``info["prepare_runs"]``).

Shape letters: P pairs, N nodes, B blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from ..batching import plan_batch
from ..cost import Cost
from ..edges.graph import graph_of
from ..model import Model
from ..nodes import NodeLayout, node_shape
from ..ops import welford_merge
from ..pairs import PromptPairs
from ..sweeps.edges import prepare_edge_sweep, receiver_layers
from ..sweeps.subsampling import SubsamplingStats, keep_mask
from .run import Executor, digest, pair_bounds, run_units, sum_costs, target_units, unit_store
from .store import saved_layout
from .units import (
    BlockUnit,
    EdgeSampleUnit,
    EdgeUnit,
    PairBlockUnit,
    PatchUnit,
    SampleUnit,
    Sweep,
    Unit,
    UnitResult,
)

# Split a layer's pairs once a unit would hold more patched forwards than this (checkpoint granularity).
MAX_UNIT_FORWARDS = 1 << 18


# Exact patching -------------------------------------------------------------------------------


def plan_patch_units(
    model: Model,
    pairs: PromptPairs,
    node_types: list[str],
    layers: list[int],
    target: int,
    pair_block: int | None = None,
    bounds: list[int] | None = None,
) -> list[PatchUnit]:
    """One unit per (pair block, layer), block by block.

    Args:
        target: units wanted (workers): pairs split when there are too few layers or too many forwards.
        pair_block: pairs per block instead (in-process: the memory plan's, so every forward is the one of a
            sweep over the blocks).
        bounds: the pair blocks' bounds instead (a resumed folder's).
    """
    per_layer = sum(int(torch.Size(node_shape(t, model.sizes, pairs.seq_len)[1:]).numel()) for t in node_types)
    blocks = max(math.ceil(target / len(layers)), math.ceil(per_layer * pairs.n_pairs / MAX_UNIT_FORWARDS))
    bounds = bounds or pair_bounds(pairs.n_pairs, blocks, pair_block)
    units = []
    for start, stop in zip(bounds, bounds[1:]):
        for layer in layers:
            work = per_layer * (stop - start)
            units.append(PatchUnit(start, stop, (layer,), work, work * (model.n_layers - layer) / model.n_layers))
    return units


def patch_on(
    executor: Executor,
    model: Model,
    pairs: PromptPairs,
    node_types: list[str],
    direction: str,
    layers: list[int],
    options: dict[str, Any],
    checkpoint: str | None,
    cost: Cost,
    pair_block: int | None = None,
    made_by: dict[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, Any]]:
    """Exhaustive exact patching of ``layers`` as work units: (effects [P, *layout] per type, base metric [P], info).

    Args:
        options: ``batch`` and ``min_chunk_tokens``.
        pair_block: pairs per unit (None: split for ``executor``'s workers).
        made_by: the options that identify the sweep's checkpoint (None: ``options``).
    """
    sweep = Sweep("patch", pairs, direction, list(node_types), options)
    units = plan_patch_units(model, pairs, node_types, layers, target_units(executor), pair_block)
    saved = saved_layout(checkpoint)
    if isinstance(saved, dict) and saved.get("layers") == layers and _partition(saved.get("pairs"), pairs.n_pairs):
        # Resuming: the folder's pair blocks when they fit this run's memory plan (else the folder is refused).
        if pair_block is None or max(b - a for a, b in saved["pairs"]) <= pair_block:
            bounds = [a for a, _ in saved["pairs"]] + [pairs.n_pairs]
            units = plan_patch_units(model, pairs, node_types, layers, target_units(executor), None, bounds)
    blocks = sorted({(u.pair_start, u.pair_stop) for u in units})
    layout = {"layers": layers, "pairs": [list(b) for b in blocks]}
    store = unit_store(checkpoint, "patch", model, sweep, layout, made_by)
    results, info = run_units(executor, sweep, units, store, "activation patching")
    dtype = results[0].tensors["base_metric"].dtype
    effects = {
        t: torch.zeros(pairs.n_pairs, *node_shape(t, model.sizes, pairs.seq_len), dtype=dtype) for t in node_types
    }
    base_metric = torch.zeros(pairs.n_pairs, dtype=dtype)
    for unit, result in zip(units, results):
        for t in node_types:
            effects[t][unit.pair_start : unit.pair_stop, list(unit.layers)] = result.tensors[t]
        base_metric[unit.pair_start : unit.pair_stop] = result.tensors["base_metric"]
    sum_costs(results, cost)
    return effects, base_metric, info


def edges_on(
    executor: Executor,
    model: Model,
    pairs: PromptPairs,
    direction: str,
    options: dict[str, Any],
    checkpoint: str | None,
    cost: Cost,
    made_by: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Exact patching of every edge alone as (pair block, receiver layer) units: (effects [P, N] (``positions``:
    [P, N, T]), base metric [P], info).

    Args:
        options: ``batch_size``, ``memory_gb``, ``positions`` and ``convention`` (the head senders, 0019).
        made_by: the options that identify the sweep's checkpoint.
    """
    graph = graph_of(model)
    footprint = EdgeUnit.footprint(model, pairs)
    batch = plan_batch(footprint, options["memory_gb"], model.device, batch_size=options["batch_size"])
    prepare = partial(prepare_edge_sweep, convention=options.get("convention", "atpstar"))
    options = {"batch": batch, "positions": options["positions"]}
    sweep = Sweep("edges", pairs, direction, ["edge"], options, prepare=prepare)
    layer_of = receiver_layers(graph)  # [N]
    per_position = pairs.seq_len if options["positions"] else 1
    blocks = math.ceil(target_units(executor) / (model.n_layers + 1)) if executor.workers else 1
    bounds = pair_bounds(pairs.n_pairs, blocks)
    units = [
        EdgeUnit(a, b, layer, work := int((layer_of == layer).sum()) * per_position * (b - a), float(work))
        for a, b in zip(bounds, bounds[1:])
        for layer in range(model.n_layers + 1)
    ]
    store = unit_store(checkpoint, "edges", model, sweep, bounds, made_by)
    results, info = run_units(executor, sweep, units, store, "exact edge patching", unit_label="edge")
    dtype = results[0].tensors["base_metric"].dtype
    effects = torch.zeros(
        pairs.n_pairs, graph.n_edges, *((pairs.seq_len,) if options["positions"] else ()), dtype=dtype
    )
    base_metric = torch.zeros(pairs.n_pairs, dtype=dtype)
    for unit, result in zip(units, results):
        effects[unit.pair_start : unit.pair_stop, layer_of == unit.layer] = result.tensors["edge"]
        base_metric[unit.pair_start : unit.pair_stop] = result.tensors["base_metric"]
    sum_costs(results, cost)
    return effects, base_metric, info


# Subsampling and the bound ----------------------------------------------------------------------


def plan_sample_units(
    total: int, batch: int, n_pairs: int, target: int, unit: type[SampleUnit] = SampleUnit
) -> list[SampleUnit]:
    """Element ranges covering ``total`` (sample, pair) elements: whole in-process batches when there are
    enough batches (then every forward is the in-process one), else finer ranges."""
    n_batches = math.ceil(total / batch)
    size = batch * math.ceil(n_batches / target) if n_batches >= target else math.ceil(total / target)
    return [
        unit(start, min(start + size, total), min(start + size, total) - start, 1.0) for start in range(0, total, size)
    ]


def subsample_on(
    executor: Executor,
    model: Model,
    pairs: PromptPairs,
    node_types: list[str],
    direction: str,
    sampling: dict[str, Any],
    batch: int,
    exclude: dict[str, torch.Tensor] | None,
    checkpoint: str | None,
    cost: Cost,
    pair_block: int | None = None,
    reduce: Callable[[SubsamplingStats], Any] | None = None,
) -> tuple[Any, torch.Tensor, dict[str, Any]]:
    """Subsampling as ranges of samples merged with Welford's parallel update: (stats, base metric [P], info).

    Args:
        batch: samples per forward (the method's memory plan: ``methods.subsampling.sample_plan``).
        pair_block: run the pairs in blocks of this many, one block's base/source runs held at a time (None or
            with a checkpoint folder: all at once). A pair's subsets do not depend on the block, so only the
            batches the samples share differ from a run over all pairs.
        reduce: applied to each block's statistics; the reductions are added up (``+``) and returned instead
            of the statistics [P, N] (the false-negative bound keeps only per-node sums).
    """
    layout = NodeLayout.of(node_types, model.sizes, pairs.seq_len)
    keep = keep_mask(layout, exclude)
    block = pairs.n_pairs if pair_block is None or checkpoint is not None else min(pair_block, pairs.n_pairs)
    if block == pairs.n_pairs:
        sweep = Sweep("samples", pairs, direction, list(node_types), {**sampling, "batch": batch}, {"keep": keep})
        values, base_metric, info = _samples_on(executor, model, sweep, SampleUnit, checkpoint, cost)
        stats = SubsamplingStats(layout.shapes, values)
        return stats if reduce is None else reduce(stats), base_metric, info
    reduced: Any = None
    whole: dict[str, torch.Tensor] = {}
    infos: list[dict[str, Any]] = []
    base_metric = torch.zeros(pairs.n_pairs, dtype=torch.float64)
    for start in range(0, pairs.n_pairs, block):
        rows = slice(start, min(start + block, pairs.n_pairs))
        options = {**sampling, "batch": batch, "pair_offset": start}
        sweep = Sweep("samples", pairs.subset(range(rows.start, rows.stop)), direction, list(node_types), options,
                      {"keep": keep})  # fmt: skip
        values, part_metric, info = _samples_on(executor, model, sweep, SampleUnit, None, cost)
        base_metric, infos = base_metric.to(part_metric.dtype), [*infos, info]
        base_metric[rows] = part_metric
        if reduce is not None:
            part = reduce(SubsamplingStats(layout.shapes, values))
            reduced = part if reduced is None else reduced + part
            continue
        for name, value in values.items():  # into [P, N], one block's rows at a time
            whole.setdefault(name, value.new_zeros((pairs.n_pairs, *value.shape[1:])))[rows] = value
    info = {**infos[0], "pair_block": block, **{k: sum(i[k] for i in infos) for k in _COUNTED if k in infos[0]}}
    return (SubsamplingStats(layout.shapes, whole) if reduce is None else reduced), base_metric, info


_COUNTED = ("units", "units_resumed", "units_retried", "prepare_runs")  # facts of a run summed over pair blocks


def edge_samples_on(
    executor: Executor,
    model: Model,
    pairs: PromptPairs,
    direction: str,
    sampling: dict[str, Any],
    batch_size: int | None,
    memory_gb: float,
    exclude: torch.Tensor | None,
    checkpoint: str | None,
    cost: Cost,
) -> tuple[SubsamplingStats, torch.Tensor, dict[str, Any]]:
    """Random joint patches of edge subsets as ranges of samples (``sweeps.edges``), merged as
    ``subsample_on`` merges node ranges: (stats over ``{"edge": (N,)}``, base metric [P], info).

    Args:
        exclude: [N] bool, edges never patched (the verified ones); None: none.
    """
    n_edges = graph_of(model).n_edges
    keep = torch.ones(n_edges, dtype=torch.bool) if exclude is None else ~exclude.to(torch.bool)  # [N]
    batch = plan_batch(EdgeSampleUnit.footprint(model, pairs), memory_gb, model.device, batch_size=batch_size)
    options = {**sampling, "batch": batch}
    sweep = Sweep("edge-samples", pairs, direction, ["edge"], options, {"keep": keep}, prepare=prepare_edge_sweep)
    values, base_metric, info = _samples_on(executor, model, sweep, EdgeSampleUnit, checkpoint, cost)
    return SubsamplingStats({"edge": (n_edges,)}, values), base_metric, info


def _samples_on(
    executor: Executor, model: Model, sweep: Sweep, unit: type[SampleUnit], checkpoint: str | None, cost: Cost
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, Any]]:
    """Run a sampling sweep's ranges and merge their statistics in element order: (values [P, N], base metric, info)."""
    total = sweep.options["samples"] * sweep.pairs.n_pairs
    # In-process without a checkpoint: one range, the very loop (and Welford merges) of a single call.
    target = target_units(executor) if executor.workers or checkpoint else 1
    units = plan_sample_units(total, sweep.options["batch"], sweep.pairs.n_pairs, target, unit)
    keep = digest(sweep.tensors["keep"])
    saved = saved_layout(checkpoint)
    if isinstance(saved, dict) and saved.get("keep") == keep and _partition(saved.get("ranges"), total):
        # Resuming: the folder's ranges, whatever batch planned them (a range's statistics do not depend on it).
        units = [unit(a, b, b - a, 1.0) for a, b in saved["ranges"]]
    layout = {"keep": keep, "ranges": [[u.start, u.stop] for u in units]}
    store = unit_store(checkpoint, sweep.kind, model, sweep, layout)
    results, info = run_units(executor, sweep, units, store, sweep.kind.replace("-", " "), unit_label="sample")
    values = {k: torch.zeros_like(v) for k, v in results[0].tensors.items() if k != "base_metric"}
    for result in results:  # in element order, as the in-process loop merges its batches
        for side in ("in", "out"):
            names = (f"count_{side}", f"mean_{side}", f"m2_{side}")
            merged = welford_merge(*(values[n] for n in names), *(result.tensors[n] for n in names))
            values.update(zip(names, merged))
    sum_costs(results, cost)
    return values, results[0].tensors["base_metric"], info


def _partition(ranges: Any, total: int) -> bool:
    """Whether ``ranges`` ([[start, stop], ...]) cover 0..``total`` in order, without gaps."""
    if not isinstance(ranges, list) or not ranges:
        return False
    bounds = [0]
    for item in ranges:
        if not (isinstance(item, list) and len(item) == 2 and item[0] == bounds[-1] and item[1] > item[0]):
            return False
        bounds.append(item[1])
    return bounds[-1] == total


# Blocks and Hierarchical ----------------------------------------------------------------------


class BlockPatcher:
    """Patches lists of blocks as work units on one sweep (the workers keep its base/source runs
    between calls, so Hierarchical's rounds prepare once). ``info`` and ``base_metric`` accumulate."""

    def __init__(
        self,
        executor: Executor,
        pairs: PromptPairs,
        node_types: list[str],
        direction: str,
        batches: dict[str, int],
        cost: Cost,
    ) -> None:
        self.executor = executor
        options = {"batches": batches}  # node type -> patched forwards per batch
        self.sweep = Sweep("blocks", pairs, direction, list(node_types), options)
        self.cost = cost
        self.base_metric = torch.zeros(pairs.n_pairs)
        self.info: dict[str, int] = {"workers": executor.workers, "units": 0, "units_retried": 0, "prepare_runs": 0}

    def __call__(self, blocks: list[Any], description: str = "blocks", advance: Any = None) -> torch.Tensor:
        """Effects [B, P] of patching each block jointly on each pair."""
        n_pairs = self.sweep.pairs.n_pairs
        groups: dict[tuple[str, int], list[int]] = {}
        for i, block in enumerate(blocks):
            groups.setdefault((block.node_type, block.layer), []).append(i)
        # In-process: one unit per (node type, layer), the batches of one sweep over the blocks.
        per_unit = (
            max(1, math.ceil(len(blocks) / target_units(self.executor))) if self.executor.workers else len(blocks)
        )
        members = [g[k : k + per_unit] for g in groups.values() for k in range(0, len(g), per_unit)]
        units: list[Unit] = [
            BlockUnit(tuple(tuple(blocks[i]) for i in m), len(m) * n_pairs, float(len(m))) for m in members
        ]
        results, info = run_units(self.executor, self.sweep, units, None, description, "block", advance)
        effects = torch.zeros(len(blocks), n_pairs, dtype=torch.float64)
        for member, result in zip(members, results):
            effects[member] = result.tensors["effects"]
        self.base_metric = results[0].tensors["base_metric"]
        for key in ("units", "units_retried", "prepare_runs"):
            self.info[key] += info[key]
        sum_costs(results, self.cost)
        return effects


# Any method whose pairs do not interact -----------------------------------------------------------


def plan_pair_units(n_pairs: int, target: int) -> list[PairBlockUnit]:
    """Consecutive blocks of pairs, as even as they come, at most ``target`` of them."""
    blocks = min(n_pairs, target)
    bounds = [n_pairs * k // blocks for k in range(blocks + 1)]
    return [PairBlockUnit(start, stop, stop - start, float(stop - start)) for start, stop in zip(bounds, bounds[1:])]


def pair_blocks_on(
    executor: Executor,
    method: Any,
    model: Model,
    pairs: PromptPairs,
    node_types: list[str],
    direction: str,
    checkpoint: str | None = None,
) -> tuple[list[UnitResult], dict[str, Any]]:
    """``method``'s call on every block of pairs as work units, in pair order: (the blocks' results, run facts).

    Each result holds ``per_pair/<t>`` [P_block, *layout] and ``extras/<k>`` tensors, the block's cost and its
    ``info`` (``meta["info"]``); ``Attribution.concat`` merges them (``methods.base``).

    Args:
        method: a ``Method`` whose pairs do not interact (its result on a pair does not depend on the others).
    """
    sweep = Sweep("pairs", pairs, direction, list(node_types), {"method": method})
    units = plan_pair_units(pairs.n_pairs, target_units(executor))
    layout = [[u.start, u.stop] for u in units]
    store = unit_store(checkpoint, method.id, model, sweep, layout, method.get_options())
    results, run_info = run_units(executor, sweep, units, store, method.id, unit_label="pair")
    run_info.pop("prepare_runs")  # every block runs its own base/source runs, counted in its cost
    return results, run_info
