"""Progress bars that can be switched off."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm


@contextmanager
def progress_bar(total: int, description: str, enabled: bool) -> Iterator[Any]:
    bar = tqdm(total=total, desc=description, disable=not enabled, unit="node", dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
