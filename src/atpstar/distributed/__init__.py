"""Sweeps as work units that split a sweep without changing its result, run in-process or on Ray.

Every sweep (exact patching of nodes and edges, verification, subsampling and the bound, blocks,
hierarchical, and any method whose pairs do not interact, by blocks of pairs) is a list of units run by
an executor: ``LocalExecutor`` in-process, ``RayExecutor`` on ``workers=`` / ``ray_address=``. A
``checkpoint=`` is always a folder of unit files. Ray is imported only when workers are asked for
(``pip install 'atpstar[distributed]'``). The engines the units run live below, in ``atpstar.sweeps``.

- ``units``: the work units (``Unit``: one class per kind of share) and the worker-side state that runs them.
- ``sweeps``: planning units per sweep kind and merging their results.
- ``run``: running a list of units (resume, progress, cost).
- ``store``: one checkpoint file per finished unit, for resuming.
- ``executor`` / ``pool`` / ``source``: in-process and Ray execution, the actors, shipping the model.
"""

from __future__ import annotations

from .executor import LocalExecutor, RayExecutor, executor_for
from .pool import WorkerError
from .store import UnitStore
from .units import Sweep, Unit, UnitResult, WorkerState

__all__ = [
    "LocalExecutor",
    "RayExecutor",
    "Sweep",
    "Unit",
    "UnitResult",
    "UnitStore",
    "WorkerError",
    "WorkerState",
    "executor_for",
]
