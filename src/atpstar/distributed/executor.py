"""Executors run work units: in-process (``LocalExecutor``) or on Ray actors (``RayExecutor``).

Ray is the engine: the driver keeps one actor per worker (``num_gpus=1`` each when the cluster has
GPUs, ``threads`` CPU threads each), every actor loads the model once, and the driver hands out
units, biggest first, as actors become free. An actor that dies (killed, out of memory, node lost)
is replaced and its unit handed to the next free actor: results are merged once per unit, from the
actor that finished it, so nothing is lost or counted twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..errors import AtpstarError, InputError
from ..model import Model
from .pool import WorkerError, get_pool
from .units import Sweep, Unit, UnitResult, WorkerState

# A unit is handed out at most this many times before the sweep fails (a unit that kills every
# worker it runs on is a bug to report, not to retry forever).
MAX_ATTEMPTS = 4

# Seconds the driver blocks in ``ray.wait`` at a time (signals are handled between slices).
WAIT_SLICE_S = 0.5

OnResult = Callable[[int, UnitResult], None]


class LocalExecutor:
    """Runs units one after another in this process (resumable sweeps without Ray)."""

    workers = 0

    def __init__(self, model: Model, progress: bool, one_block: bool = False) -> None:
        self.state = WorkerState(model, one_block)
        self.progress = progress

    def map(self, sweep: Sweep, jobs: list[tuple[int, Unit]], on_result: OnResult) -> int:
        """Run ``jobs`` ((index, unit)); call ``on_result(index, result)`` as each finishes; return retries (0)."""
        for index, unit in jobs:
            on_result(index, self.state.run(sweep, unit))
        return 0


def executor_for(model: Model, workers: Any, ray_address: Any, progress: bool) -> LocalExecutor | RayExecutor:
    """An executor for ``workers`` Ray workers at ``ray_address``; in-process when both are None."""
    if workers is None and ray_address is None:
        return LocalExecutor(model, progress)
    if workers is None:
        raise InputError("ray_address needs workers=N too (the number of Ray workers to run on)")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise InputError(f"workers must be an integer >= 1 (Ray workers) or None (in-process); got {workers!r}")
    if ray_address is not None and not isinstance(ray_address, str):
        raise InputError(
            f"ray_address must be a string such as 'auto' or 'ray://host:10001', or None; got {ray_address!r}"
        )
    return RayExecutor(model, workers, ray_address, progress)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise InputError(
            "workers= runs on Ray, which is not installed; pip install 'atpstar[distributed]' (or pip install ray)"
        ) from err
    return ray


def connect(ray_address: str | None, workers: int) -> Any:
    """Connect to Ray: keep an existing connection, join ``ray_address``, or start a local instance."""
    ray = _import_ray()
    if not ray.is_initialized():
        if ray_address is None:
            ray.init(num_cpus=max(os.cpu_count() or 1, workers), include_dashboard=False, log_to_driver=False)
        else:
            try:
                ray.init(address=ray_address, log_to_driver=False)
            except ConnectionError as err:
                raise InputError(
                    f"could not join the Ray cluster at {ray_address!r} ({err}); start one with 'ray start --head', "
                    "or pass ray_address=None to start a local one"
                ) from err
    return ray


class RayExecutor:
    """Runs units on ``workers`` Ray actors (see the module docstring)."""

    def __init__(self, model: Model, workers: int, ray_address: str | None, progress: bool) -> None:
        from .source import source_for

        self.ray = connect(ray_address, workers)
        self.workers = workers
        self.progress = progress
        self.pool = get_pool(self.ray, workers)
        self.source = source_for(model)

    def map(self, sweep: Sweep, jobs: list[tuple[int, Unit]], on_result: OnResult) -> int:
        from .source import pickle_by_value

        ray = self.ray
        pickle_by_value(sweep.pairs.metric)
        sweep_ref = ray.put(sweep)
        queue = sorted(jobs, key=lambda job: -job[1].weight)  # biggest first: less waiting at the end
        attempts: dict[int, int] = {}
        running: dict[Any, tuple[int, int, Unit]] = {}  # object ref -> (actor slot, index, unit)
        free = list(range(self.workers))
        retries = 0
        try:
            while queue or running:
                while queue and free:
                    slot, (index, unit) = free.pop(0), queue.pop(0)
                    attempts[index] = attempts.get(index, 0) + 1
                    ref = self.pool.actor(slot).run.remote([self.source], sweep_ref, unit)
                    running[ref] = (slot, index, unit)
                ready = _wait_one(ray, running)
                slot, index, unit = running.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except _actor_death(ray) as err:
                    retries += 1
                    if attempts[index] >= MAX_ATTEMPTS:
                        raise WorkerError(
                            f"work unit {unit.name} was started {attempts[index]} times and its worker died each "
                            f"time (last: {type(err).__name__}); check worker memory and logs (ray logs)"
                        ) from err
                    self.pool.replace(slot)
                    queue.insert(0, (index, unit))
                    free.append(slot)
                    continue
                except ray.exceptions.RayTaskError as err:
                    cause = err.cause if isinstance(err.cause, BaseException) else None
                    if isinstance(cause, AtpstarError):
                        raise cause from None
                    raise
                free.append(slot)
                on_result(index, result)
        finally:
            self.stop(running)  # interrupted (Ctrl-C) or failed; finished units are already saved
        return retries

    def stop(self, running: dict[Any, tuple[int, int, Unit]]) -> None:
        """Stop the units still running: cancel their tasks and replace their actors (a running task of an
        actor cannot be cancelled, and an actor busy with an abandoned unit would hold up the next sweep)."""
        ray = self.ray
        for ref, (slot, _, _) in running.items():
            try:
                ray.cancel(ref)
            except (ValueError, TypeError, ray.exceptions.RayError):
                pass  # already finished or its worker is gone: nothing left to stop
            self.pool.replace(slot)
        running.clear()


def _wait_one(ray: Any, running: dict[Any, Any]) -> list[Any]:
    """The next finished task, waiting in short slices so that Ctrl-C reaches the driver within a second."""
    while True:
        ready, _ = ray.wait(list(running), num_returns=1, timeout=WAIT_SLICE_S)
        if ready:
            return ready


def _actor_death(ray: Any) -> tuple[type[BaseException], ...]:
    e = ray.exceptions
    return (e.RayActorError, e.WorkerCrashedError, e.NodeDiedError, e.OutOfMemoryError, e.ObjectLostError)
