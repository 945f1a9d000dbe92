"""Fault injection for the distributed tests: a work unit whose worker process dies the first time.

Lives in ``reference`` so Ray workers can import it (the test fixture puts ``tests/`` on their path).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class CrashOnce:
    """Wraps a real work unit; the first worker to run it exits abruptly (as if killed or out of memory)
    and leaves ``marker`` behind, so the retry elsewhere runs the real unit."""

    inner: Any
    marker: str

    def __getattr__(self, name: str) -> Any:  # name, work, weight, pair_start, layers, ... of the real unit
        if name.startswith("__") or name == "inner":  # unpickling looks these up before ``inner`` is set
            raise AttributeError(name)
        return getattr(self.inner, name)

    def run(self, worker: Any, sweep: Any) -> Any:
        marker = Path(self.marker)
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)  # no cleanup, no exception: the process is just gone
        return self.inner.run(worker, sweep)


@dataclass(frozen=True)
class Slow:
    """Wraps a real work unit; its worker sleeps ``seconds`` before running it (a long unit to interrupt)."""

    inner: Any
    seconds: float

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def run(self, worker: Any, sweep: Any) -> Any:
        import time

        time.sleep(self.seconds)
        return self.inner.run(worker, sweep)
