"""Batches that halve on CUDA out-of-memory errors and remember the size that fit.

A batch that runs out of accelerator memory is retried in halves (the user is told with a warning);
later batches of the same run start at the size that fit, so one OOM costs one retry, not one per
batch. Nothing is counted twice: methods add a pass to their ``Cost`` only after it completes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

from .devices import free_cached_memory, is_cuda_oom
from .errors import OutOfMemory

R = TypeVar("R")


class BatchGuard:
    """Runs work in slices of at most ``limit`` elements, halving ``limit`` on CUDA out-of-memory.

    Args:
        what: what an element is, for messages (e.g. ``"atp*: pairs"``).
        device: the device whose cache is emptied after an out-of-memory error.
    """

    def __init__(self, what: str, device: torch.device | None = None) -> None:
        self.what = what
        self.device = device or torch.device("cpu")
        self.limit: int | None = None  # None: no out-of-memory error seen yet
        self.retries = 0

    def run(self, n: int, step: Callable[[slice], R]) -> list[R]:
        """``step`` over consecutive slices covering 0..n-1; returns their results in order."""
        results: list[R] = []
        start = 0
        while start < n:
            size = n - start if self.limit is None else min(self.limit, n - start)
            failed = False
            try:
                results.append(step(slice(start, start + size)))
            except Exception as err:
                if not is_cuda_oom(err):
                    raise
                if size == 1:
                    raise OutOfMemory(
                        f"{self.what}: out of memory on {self.device} even for a batch of one; free memory, "
                        "spread the model over more devices (device_map) or offload layers to the CPU"
                    ) from err
                failed = True  # retry outside the handler, so the failed batch's tensors are released
            if failed:
                self.limit = size // 2
                self.retries += 1
                free_cached_memory(self.device)
                warnings.warn(
                    f"atpstar: {self.what}: out of memory on {self.device} with a batch of {size}; "
                    f"halved it to {self.limit} and retried (set a smaller memory_gb or batch_size to avoid this)",
                    stacklevel=2,
                )
                continue
            start += size
        return results
