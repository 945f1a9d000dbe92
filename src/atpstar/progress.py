"""Progress bars that can be switched off."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm


@contextmanager
def progress_bar(total: int, description: str, enabled: bool, unit: str = "node") -> Iterator[Any]:
    """A tqdm bar counting ``unit``s (``total`` 0: unknown length); closed also on error or interrupt."""
    bar = tqdm(total=total or None, desc=description, disable=not enabled, unit=unit, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
