"""The Ray actors of this process: started once, reused by every later sweep (they keep the model).

One actor per worker; each asks Ray for one GPU when the cluster has GPUs, and for ``threads`` CPUs
(torch uses that many threads). Set ``ATPSTAR_WORKER_THREADS`` to choose the threads; by default
the cluster's CPUs are shared out among the workers.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import torch

from ..errors import AtpstarError
from .source import ModelSource
from .units import Sweep, Unit, UnitResult, WorkerState


class WorkerError(AtpstarError):
    """Workers kept dying on the same unit, or the cluster cannot host the workers asked for."""


def worker_device() -> str:
    """``cuda`` when Ray gave this worker a GPU (it sets CUDA_VISIBLE_DEVICES), else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class AtpstarWorker:
    """A Ray actor (wrapped with ``ray.remote`` by the pool): holds one model and its sweep caches."""

    def __init__(self, threads: int) -> None:
        torch.set_num_threads(threads)
        self.state: WorkerState | None = None
        self.key: str | None = None

    def run(self, source: list[ModelSource], sweep: Sweep, unit: Unit) -> UnitResult:
        if self.key != source[0].key:  # a new model: load it once, drop the previous one
            self.state = None
            self.state = WorkerState(source[0].load(worker_device()))
            self.key = source[0].key
        assert self.state is not None
        return self.state.run(sweep, unit)

    def pid(self) -> int:
        return os.getpid()


class Pool:
    """``workers`` actors with the same resources; ``replace`` swaps a dead one for a fresh one."""

    def __init__(self, ray: Any, workers: int) -> None:
        self.ray = ray
        self.session = _session(ray)
        resources = ray.cluster_resources()
        self.gpus = int(resources.get("GPU", 0))
        cpus = int(resources.get("CPU", 1))
        if self.gpus and workers > self.gpus:
            raise WorkerError(
                f"workers={workers} but the Ray cluster has {self.gpus} GPU(s); each worker takes one GPU, so ask "
                f"for at most {self.gpus} workers"
            )
        default = 1 if self.gpus else max(1, cpus // workers)
        self.threads = int(os.environ.get("ATPSTAR_WORKER_THREADS", default))
        if not self.gpus and workers * self.threads > cpus:
            raise WorkerError(
                f"workers={workers} with {self.threads} thread(s) each need {workers * self.threads} CPUs, but the Ray "
                f"cluster has {cpus}; ask for fewer workers or set ATPSTAR_WORKER_THREADS"
            )
        self._remote = ray.remote(AtpstarWorker)
        self.actors: list[Any] = []
        self.grow(workers)

    def _start(self) -> Any:
        options: dict[str, Any] = {
            "num_cpus": self.threads,
            "max_restarts": 0,  # the driver replaces dead workers itself and re-queues their unit
            "max_task_retries": 0,
            "name": f"atpstar-worker-{os.getpid()}-{next(_ACTOR_NUMBER)}",  # visible in `ray list actors`
        }
        if self.gpus:
            options["num_gpus"] = 1
        return self._remote.options(**options).remote(self.threads)

    def grow(self, workers: int) -> None:
        while len(self.actors) < workers:
            self.actors.append(self._start())

    def actor(self, slot: int) -> Any:
        return self.actors[slot]

    def replace(self, slot: int) -> None:
        try:
            self.ray.kill(self.actors[slot], no_restart=True)
        except ValueError:
            pass  # already gone
        self.actors[slot] = self._start()


_POOL: Pool | None = None
_ACTOR_NUMBER = itertools.count()  # actor names stay unique in this process, across pools


def get_pool(ray: Any, workers: int) -> Pool:
    """The actors of this process's Ray session, grown to ``workers`` (a new session starts afresh)."""
    global _POOL
    threads = os.environ.get("ATPSTAR_WORKER_THREADS")
    if (
        _POOL is None
        or _POOL.session != _session(ray)
        or (threads is not None and int(threads) != _POOL.threads)
        or (threads is None and _POOL.gpus == 0 and len(_POOL.actors) < workers)  # CPU shares sized for fewer
    ):
        if _POOL is not None and _POOL.session == _session(ray):
            for actor in _POOL.actors:
                ray.kill(actor, no_restart=True)
        _POOL = Pool(ray, workers)
    _POOL.grow(workers)
    return _POOL


def _session(ray: Any) -> str:
    return str(ray.get_runtime_context().get_job_id())
