"""Running a sweep's work units: resume from the unit folder, run the rest on an executor, count the cost.

Every sweep (``sweeps``) is a list of units; ``run_units`` skips the ones whose file is already in the
checkpoint folder (``store.UnitStore``), runs the rest on the in-process ``LocalExecutor`` or on Ray
workers (``RayExecutor``), saves each as it finishes and returns them in unit order. The cost of a
sweep is its units' passes plus the base/source runs each worker needed (``sum_costs``); a
preparation repeated only because a run was resumed is counted once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from ..cost import Cost
from ..fingerprint import identity
from ..model import Model
from ..progress import progress_bar
from .executor import LocalExecutor, RayExecutor
from .store import UnitStore
from .units import EdgeUnit, PatchUnit, Sweep, Unit, UnitResult

Executor = LocalExecutor | RayExecutor

# Sweep options that only size the forwards (from ``batch_size``/``memory_gb``): not part of a unit folder's
# identity. Where the units themselves depend on them, the sweep's layout (stored beside) says so.
FORWARD_SIZE = frozenset({"batch"})

# Aim for at least this many units per worker (units differ in size; more units balance better).
UNITS_PER_WORKER = 4


def run_units(
    executor: Executor,
    sweep: Sweep,
    units: Sequence[Unit],
    store: UnitStore | None,
    description: str,
    unit_label: str = "node",
    advance: Any = None,
) -> tuple[list[UnitResult], dict[str, Any]]:
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
    _drop_repeated_prepares(units, results, {i for i, _ in jobs})
    done = [r for r in results if r is not None]
    ran = [results[i] for i, _ in jobs]
    info: dict[str, Any] = {
        "workers": executor.workers,
        "units": len(units),
        "units_resumed": resumed,
        "units_retried": retries,
        "prepare_runs": sum(r is not None and r.prepare.forward > 0 for r in ran),
    }
    if store is not None and resumed:
        info["resumed_from"] = str(store.path)
    return done, info


def _drop_repeated_prepares(units: Sequence[Unit], results: list[UnitResult | None], ran: set[int]) -> None:
    """Preparations repeated because a run was resumed are counted once: resumed units keep one preparation
    per pair block, and none for a block this run prepared again (work lost to the interruption)."""
    seen = {_pair_block(units[i]) for i in ran if (r := results[i]) is not None and r.prepare.forward > 0}
    for i, (unit, result) in enumerate(zip(units, results)):
        if i in ran or result is None or result.prepare.forward == 0:
            continue
        if _pair_block(unit) in seen:
            results[i] = replace(result, prepare=Cost())
        seen.add(_pair_block(unit))


def _pair_block(unit: Unit) -> tuple[int, int] | None:
    """The pairs whose base/source runs a unit needs (None: all of them)."""
    return (unit.pair_start, unit.pair_stop) if isinstance(unit, PatchUnit | EdgeUnit) else None


def sum_costs(results: list[UnitResult], cost: Cost) -> None:
    """Add every unit's passes and the base/source runs its worker needed to ``cost``."""
    for result in results:
        cost.forward += result.cost.forward + result.prepare.forward
        cost.backward += result.cost.backward + result.prepare.backward


def unit_store(
    checkpoint: str | None, kind: str, model: Model, sweep: Sweep, extra: Any, options: dict[str, Any] | None = None
) -> UnitStore | None:
    """The unit folder of a sweep, identified by what computes it (``options``: the sweep's by default, less
    what only sizes the forwards) and by ``extra``, the sweep's layout (units that depend on the batch must
    say so here: a folder of another layout is refused, never mixed)."""
    if checkpoint is None:
        return None
    numbers = {k: v for k, v in (options or sweep.options).items() if k not in FORWARD_SIZE}
    made_by = identity(model, sweep.pairs, sweep.direction, sweep.node_types, kind, numbers)
    made_by["layout"] = json.dumps(extra, sort_keys=True, default=str)  # the sweep's own units and layers
    return UnitStore(checkpoint, made_by)


def digest(tensor: torch.Tensor) -> str:
    """Content hash of a CPU tensor (stable across processes, unlike ``hash``)."""
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()[:24]


def target_units(executor: Executor) -> int:
    return max(8, UNITS_PER_WORKER * executor.workers)


def pair_bounds(n_pairs: int, blocks: int | None, block: int | None = None) -> list[int]:
    """Pair block bounds: ``blocks`` even blocks, or consecutive blocks of ``block`` pairs (the last smaller)."""
    if block is not None:
        return [*range(0, n_pairs, block), n_pairs]
    blocks = min(n_pairs, blocks or 1)
    return [n_pairs * k // blocks for k in range(blocks + 1)]
