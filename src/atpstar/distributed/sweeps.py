"""Sweeps as work units: plan the units, run them (resuming from unit checkpoints), merge the results.

Merged results equal the in-process ones: exact patching and verification compute each (node, pair)
effect independently, so only the batch a forward shares differs (float rounding); Subsampling's
element ranges follow the in-process batches where they can and their Welford statistics merge
exactly (``ops.welford_merge``); blocks are patched one block per forward either way. The cost is the
sum of the units' costs plus the base/source runs each worker needed (``info["prepare_runs"]``).

Shape letters: P pairs, N nodes, B blocks.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

import torch

from ..cost import Cost
from ..fingerprint import identity
from ..model import Model
from ..nodes import NodeLayout, node_shape
from ..ops import welford_merge
from ..pairs import PromptPairs
from ..progress import progress_bar
from ..sweeps.subsampling import SubsamplingStats, keep_mask, sample_batch
from .executor import LocalExecutor, RayExecutor
from .store import UnitStore
from .units import BlockUnit, PatchUnit, RankUnit, SampleUnit, Sweep, Unit, UnitResult

Executor = LocalExecutor | RayExecutor

# Aim for at least this many units per worker (units differ in size; more units balance better).
UNITS_PER_WORKER = 4
# Split a layer's pairs once a unit would hold more patched forwards than this (checkpoint granularity).
MAX_UNIT_FORWARDS = 1 << 18
# Largest verification window (nodes).
MAX_WINDOW = 4096


def run_units(
    executor: Executor,
    sweep: Sweep,
    units: Sequence[Unit],
    store: UnitStore | None,
    description: str,
    unit_label: str = "node",
    advance: Any = None,
) -> tuple[list[UnitResult], dict[str, int]]:
    """Run every unit not already in ``store``; results in unit order, and run facts for ``info``.

    The progress bar counts the whole sweep (units resumed from checkpoints count as done); pass
    ``advance`` to count on an outer bar instead.
    """
    results: list[UnitResult | None] = [store.load(u) if store else None for u in units]
    resumed = sum(r is not None for r in results)
    jobs = [(i, u) for i, (u, r) in enumerate(zip(units, results)) if r is None]

    def finish(index: int, result: UnitResult, update: Any) -> None:
        if store is not None:
            store.save(units[index], result)
        results[index] = result
        update(units[index].work)

    if advance is not None:
        retries = executor.map(sweep, jobs, lambda i, r: finish(i, r, advance))
    else:
        total = sum(u.work for u in units)
        with progress_bar(total, description, executor.progress, unit=unit_label) as bar:
            bar.update(sum(u.work for u, r in zip(units, results) if r is not None))
            retries = executor.map(sweep, jobs, lambda i, r: finish(i, r, bar.update))
    done = [r for r in results if r is not None]
    ran = [results[i] for i, _ in jobs]
    info = {
        "workers": executor.workers,
        "units": len(units),
        "units_resumed": resumed,
        "units_retried": retries,
        "prepare_runs": sum(r is not None and r.prepare.forward > 0 for r in ran),
    }
    return done, info


def sum_costs(results: list[UnitResult], cost: Cost) -> None:
    """Add every unit's passes and the base/source runs its worker needed to ``cost``."""
    for result in results:
        cost.forward += result.cost.forward + result.prepare.forward
        cost.backward += result.cost.backward + result.prepare.backward


def _store(checkpoint: str | None, kind: str, model: Model, sweep: Sweep, extra: Any) -> UnitStore | None:
    if checkpoint is None:
        return None
    made_by = identity(model, sweep.pairs, sweep.direction, sweep.node_types, kind, sweep.options)
    made_by["layout"] = json.dumps(extra, sort_keys=True, default=str)  # the sweep's own units and layers
    return UnitStore(checkpoint, made_by)


def _digest(tensor: torch.Tensor) -> str:
    """Content hash of a CPU tensor (stable across processes, unlike ``hash``)."""
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()[:24]


def _target_units(executor: Executor) -> int:
    return max(8, UNITS_PER_WORKER * executor.workers)


# Exact patching -------------------------------------------------------------------------------


def plan_patch_units(
    model: Model, pairs: PromptPairs, node_types: list[str], layers: list[int], target: int
) -> list[PatchUnit]:
    """One unit per (pair block, layer); pairs split when there are too few layers or too many forwards."""
    per_layer = sum(int(torch.Size(node_shape(t, model.sizes, pairs.seq_len)[1:]).numel()) for t in node_types)
    blocks = max(math.ceil(target / len(layers)), math.ceil(per_layer * pairs.n_pairs / MAX_UNIT_FORWARDS))
    blocks = min(pairs.n_pairs, blocks)
    bounds = [pairs.n_pairs * k // blocks for k in range(blocks + 1)]
    units = []
    for layer in layers:
        for start, stop in zip(bounds, bounds[1:]):
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
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, int]]:
    """Exhaustive exact patching of ``layers`` as work units: (effects [P, *layout] per type, base metric [P], info)."""
    sweep = Sweep("patch", pairs, direction, list(node_types), options)
    units = plan_patch_units(model, pairs, node_types, layers, _target_units(executor))
    store = _store(checkpoint, "patch", model, sweep, layers)
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


# Verification ---------------------------------------------------------------------------------


def plan_rank_units(n_nodes: int, n_pairs: int, target: int) -> list[RankUnit]:
    """Windows of consecutive ranks, at most ``MAX_WINDOW`` nodes each."""
    window = max(1, min(MAX_WINDOW, math.ceil(n_nodes / target)))
    return [
        RankUnit(start, min(start + window, n_nodes), (min(start + window, n_nodes) - start) * n_pairs, 1.0)
        for start in range(0, n_nodes, window)
    ]


def verify_on(
    executor: Executor,
    model: Model,
    pairs: PromptPairs,
    node_types: list[str],
    direction: str,
    ranked: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    batch: int,
    checkpoint: str | None,
    cost: Cost,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Exact effects [N, P] of ranked nodes as windows of ranks, the base metric [P], and run facts."""
    tensors = dict(zip(("type", "layer", "unit", "pos"), ranked))
    sweep = Sweep("verify", pairs, direction, list(node_types), {"batch": batch}, tensors)
    n_nodes = len(ranked[0])
    if n_nodes == 0:  # nothing to verify: still run the base once for its metric
        from ..engine import prepare

        return (
            torch.zeros(0, pairs.n_pairs, dtype=torch.float64),
            prepare(model, pairs, direction, node_types, cost).base_metric,
            {"workers": executor.workers, "units": 0},
        )
    units = plan_rank_units(n_nodes, pairs.n_pairs, _target_units(executor))
    store = _store(checkpoint, "verify", model, sweep, [n_nodes, _digest(torch.stack(ranked))])
    results, info = run_units(executor, sweep, units, store, "verify")
    effects = torch.cat([r.tensors["effects"] for r in results])  # windows in rank order: [N, P]
    sum_costs(results, cost)
    return effects, results[0].tensors["base_metric"], info


# Subsampling and the bound ----------------------------------------------------------------------


def plan_sample_units(total: int, batch: int, n_pairs: int, target: int) -> list[SampleUnit]:
    """Element ranges covering ``total`` (sample, pair) elements: whole in-process batches when there are
    enough batches (then every forward is the in-process one), else finer ranges."""
    n_batches = math.ceil(total / batch)
    size = batch * math.ceil(n_batches / target) if n_batches >= target else math.ceil(total / target)
    return [
        SampleUnit(start, min(start + size, total), min(start + size, total) - start, 1.0)
        for start in range(0, total, size)
    ]


def subsample_on(
    executor: Executor,
    model: Model,
    pairs: PromptPairs,
    node_types: list[str],
    direction: str,
    sampling: dict[str, Any],
    batch_size: int | None,
    memory_gb: float,
    exclude: dict[str, torch.Tensor] | None,
    checkpoint: str | None,
    cost: Cost,
) -> tuple[SubsamplingStats, torch.Tensor, dict[str, int]]:
    """Subsampling as ranges of samples merged with Welford's parallel update: (stats, base metric [P], info)."""
    layout = NodeLayout.of(node_types, model.sizes, pairs.seq_len)
    keep = keep_mask(layout, exclude)
    batch = sample_batch(model, pairs.seq_len, len(keep), memory_gb, batch_size)
    sweep = Sweep("samples", pairs, direction, list(node_types), {**sampling, "batch": batch}, {"keep": keep})
    total = sampling["samples"] * pairs.n_pairs
    units = plan_sample_units(total, batch, pairs.n_pairs, _target_units(executor))
    store = _store(checkpoint, "samples", model, sweep, _digest(keep))
    results, info = run_units(executor, sweep, units, store, "subsampling", unit_label="sample")
    values = {k: torch.zeros_like(v) for k, v in results[0].tensors.items() if k != "base_metric"}
    for result in results:  # in element order, as the in-process loop merges its batches
        for side in ("in", "out"):
            names = (f"count_{side}", f"mean_{side}", f"m2_{side}")
            merged = welford_merge(*(values[n] for n in names), *(result.tensors[n] for n in names))
            values.update(zip(names, merged))
    sum_costs(results, cost)
    return SubsamplingStats(layout.shapes, values), results[0].tensors["base_metric"], info


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
        batch_size: int | None,
        memory_gb: float,
        cost: Cost,
    ) -> None:
        self.executor = executor
        options = {"batch_size": batch_size, "memory_gb": memory_gb}
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
        per_unit = max(1, math.ceil(len(blocks) / _target_units(self.executor)))
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
