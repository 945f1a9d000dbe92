"""Batch sizes: one planner from a memory budget, and batches that halve on CUDA out-of-memory errors.

``plan_batch`` is the one batching rule: every loop declares its ``Footprint`` (what one batch element
adds, what the loop holds beside the batch) and gets ``batch_size`` if the user gave one, else the
most elements that fit in ``memory_gb`` GiB next to what it holds (at least one).

A batch that runs out of accelerator memory is retried in halves (``BatchGuard``; the user is told
with a warning); later batches of the same run start at the size that fit, so one OOM costs one retry,
not one per batch. Nothing is counted twice: methods add a pass to their ``Cost`` only after it completes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from .devices import HOST_MEMORY, free_cached_memory, is_cuda_oom
from .errors import InputError, OutOfMemory

GIB = 2**30

# Share of ``memory_gb`` that loops over blocks of pairs leave to what their estimates do not count (results
# such as verified effects [n, P], a layer's element index tensors, the allocator's free lists): on 10,000
# toy-ioi pairs a plan that used the whole budget peaked 11 % over it (``benchmarks/memory_pairs.py``).
HEADROOM = 0.15


@dataclass(frozen=True)
class Footprint:
    """The memory of a batched loop, in bytes.

    Attributes:
        per_item: one batch element (a patched forward's activations and masks, a pair's autograd graph).
        held: held for the whole loop beside the batch (cached activations, running statistics).
        host: results kept in host memory: counted against the budget only when the loop computes on
            the CPU (beside an accelerator they live in the host's memory, not the device's).
    """

    per_item: float
    held: float = 0
    host: float = 0

    def fixed(self, device: torch.device | str | None) -> float:
        """Bytes held beside the batch on ``device``."""
        on_cpu = device is None or torch.device(device).type == "cpu"
        return self.held + (self.host if on_cpu else 0)


def plan_batch(
    footprint: Footprint | float,
    memory_gb: float,
    device: torch.device | str | None = None,
    *,
    batch_size: int | None = None,
    most: int | None = None,
    what: str | None = None,
    fix: str = "Raise memory_gb",
) -> int:
    """The batch of a loop: ``batch_size`` if given, else as many elements as fit in ``memory_gb`` GiB.

    Args:
        footprint: the loop's ``Footprint``, or the bytes of one element (nothing else held).
        memory_gb: the budget in GiB, besides the model's weights.
        device: where the loop computes (decides whether ``footprint.host`` counts).
        batch_size: the user's batch size; None plans from the budget.
        most: elements in the whole loop (the batch never exceeds it).
        what: name the loop to refuse a budget that does not hold one element (``InputError``);
            None plans at least one element whatever the budget.
        fix: what the refusal tells the user to do.

    Returns:
        The batch, at least 1 (and at most ``most``).
    """
    if not isinstance(footprint, Footprint):
        footprint = Footprint(footprint)
    if batch_size is None:
        fixed = footprint.fixed(device)
        room = memory_gb * GIB - fixed
        if what is not None and room < footprint.per_item:
            raise InputError(
                f"{what}: memory_gb={memory_gb:g} is too small: the run holds {fixed / GIB:.2f} GB (caches and "
                f"results) and one batch element needs {footprint.per_item / GIB:.3f} GB more. {fix}"
            )
        batch = int(room // max(1, footprint.per_item))
    else:
        batch = batch_size
    return max(1, batch if most is None else min(batch, max(1, most)))


def pairs_per_block(
    n_pairs: int, per_pair: float, memory_gb: float, what: str, fix: str = "Raise memory_gb", held: float = 0
) -> int:
    """Pairs whose prepared runs a loop holds at once: all when they take at most half of what ``memory_gb``
    leaves beside ``held`` bytes (the other half is the batches'), else as many as that half holds (at least
    one, else ``InputError``)."""
    share = (memory_gb * GIB - held) / 2
    if n_pairs * per_pair <= share:
        return n_pairs
    if per_pair > share:
        kept = f" beside the {held / GIB:.2f} GB the run keeps" if held else ""
        raise InputError(
            f"{what}: memory_gb={memory_gb:g} is too small: one pair's prepared runs need {per_pair / GIB:.3f} GB "
            f"and they may take half the budget{kept}. {fix}"
        )
    return int(share // per_pair)


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
            HOST_MEMORY.release(self.device)  # a CPU batch's freed activations go back to the system
        return results
