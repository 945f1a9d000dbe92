"""``PatchedForwards``: the base of methods built on patched forwards (exact patching, Subsampling, Blocks,
Hierarchical), which plan their memory the same way (``memory.patching_plan``).

A subclass says what its run holds (``_sizes``): the patched forwards of the run, bytes held besides the
cached activations, bytes per patched forward besides its activations, per-pair results, and whether it
streams over blocks of pairs; ``batch_size`` and ``memory_gb`` are its options.
"""

from __future__ import annotations

from typing import Any

from ..memory import MemoryPlan, patching_plan
from ..model import Model
from .base import Method


class PatchedForwards(Method):
    """A method whose work is patched forwards from cached base/source runs."""

    batch_size: int | None
    memory_gb: float

    def memory_plan(self, model: Model, n_pairs: int, seq_len: int, node_types: list[str]) -> MemoryPlan:
        sizes = self._sizes(model, n_pairs, seq_len, node_types)
        return patching_plan(
            model, self.id, n_pairs, seq_len, node_types, batch_size=self.batch_size, memory_gb=self.memory_gb, **sizes
        )

    def _sizes(self, model: Model, n_pairs: int, seq_len: int, node_types: list[str]) -> dict[str, Any]:
        """``n_items``, ``run_bytes``, ``item_extra``, ``results_bytes`` (and ``pair_blocks``) of
        ``memory.patching_plan`` for a run on ``n_pairs`` pairs of ``seq_len`` tokens."""
        raise NotImplementedError
