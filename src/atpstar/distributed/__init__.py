"""Sweeps across many workers: work units that split a sweep without changing its result, run on Ray.

``workers=`` / ``ray_address=`` on ``atpstar.attribute`` (activation_patching, subsampling, blocks,
hierarchical), ``atpstar.verify`` and ``atpstar.false_negative_bound`` route here. Ray is imported
only when workers are asked for (``pip install 'atpstar[distributed]'``).

- ``units``: the work units and the worker-side state that runs them.
- ``sweeps``: planning units per sweep kind, running them, merging their results.
- ``store``: one checkpoint file per finished unit, for resuming.
- ``executor`` / ``pool`` / ``source``: in-process and Ray execution, the actors, shipping the model.
"""

from __future__ import annotations

from .executor import LocalExecutor, RayExecutor, executor_for
from .pool import WorkerError
from .store import UnitStore
from .units import BlockUnit, PatchUnit, RankUnit, SampleUnit, Sweep, UnitResult, WorkerState

__all__ = [
    "BlockUnit",
    "LocalExecutor",
    "PatchUnit",
    "RankUnit",
    "RayExecutor",
    "SampleUnit",
    "Sweep",
    "UnitResult",
    "UnitStore",
    "WorkerError",
    "WorkerState",
    "executor_for",
]
