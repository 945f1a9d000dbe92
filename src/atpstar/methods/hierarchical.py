"""Hierarchical: patch coarse blocks, split the ones with large |effect|, recurse to single nodes (Kramár et al. 2024).

Group testing over the flattened per-layer layout of each node type: the roots are whole layers of
one node type; a block whose mean over pairs of |effect| is large is split into ``branching``
contiguous children, which are patched in turn. A node's score is the effect of the finest block
containing it that was patched. Same cancellation weakness as Blocks; cost adapts to sparsity.
Cost: 2P full forwards, then per patched block and pair one forward started at its layer ((L - l) / L).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Mapping
from typing import Any

import torch

from ..cost import Cost
from ..model import Model
from ..nodes import node_shape
from ..pairs import PromptPairs
from ..progress import progress_bar
from ..sweeps.blocks import Block, per_layer
from ..validate import check_batching, check_count, check_number
from .base import register
from .blocks import JointPatching, block_batches


@register(
    "hierarchical",
    summary="group testing: patch coarse blocks, split those with a large |effect|, down to single nodes",
)
class Hierarchical(JointPatching):
    """Hierarchical group testing: split blocks with large |effect| until single nodes.

    Splitting is decided on the mean over pairs of |block effect| (the same aggregation as
    ``scores``), so every pair sees the same blocks. ``per_pair[t]`` [P, *layout] is the signed
    effect, on each pair, of the finest patched block containing the node: a single node reached at
    the bottom has its exact effect; a node never reached keeps the effect of its last (coarsest
    unsplit) block, which over-states it when the block holds other effects.

    Args:
        branching: children per split block (contiguous, sizes differing by at most one).
        threshold: split a block only when its mean |effect| exceeds this; None: no threshold.
        budget: at most this many block patches per pair, roots included (the roots, one per layer and
            node type, are always patched); blocks are split largest mean |effect| first. None: no
            limit when ``threshold`` is given; with neither given, ``budget`` is a tenth of the
            number of nodes (a tenth of exhaustive patching's cost).
        batch_size: patched forwards per batch; None picks it from ``memory_gb``. Blocks are split in
            rounds of up to ``batch_size // P`` children, largest first; with a ``budget`` the exact
            set of split blocks can therefore depend on ``batch_size`` (ties to the budget edge).
        memory_gb: bound on the run's memory besides the weights (cache, results, one batch).
    """

    aggregation = "mean_abs"
    pairs_interact = True  # splits follow the mean over pairs
    cost_is_bound = True  # which blocks get split (and at which layers) depends on the effects
    distributable = True

    branching: int = 4
    threshold: float | None = None
    budget: int | None = None
    batch_size: int | None = None
    memory_gb: float = 1.0

    def expected_cost(self, model: Model, pairs: PromptPairs, node_types: list[str], info: Mapping[str, Any]) -> Cost:
        """At most 2P full forwards and one forward per patched block and pair (``info["blocks_patched"]``)."""
        return Cost(forward=2 * pairs.n_pairs + pairs.n_pairs * int(info["blocks_patched"]))

    def _validate(self, model: Model, pairs: PromptPairs, node_types: list[str]) -> None:
        check_count("branching", self.branching, minimum=2)
        if self.threshold is not None:
            check_number("threshold", self.threshold, 0.0)
        if self.budget is not None:
            check_count("budget", self.budget)
        self.batch_size, self.memory_gb = check_batching(self.batch_size, self.memory_gb)

    def _attribute_on(
        self, executor: Any, model: Model, pairs: PromptPairs, node_types: list[str], direction: str, cost: Cost
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        from ..distributed.sweeps import BlockPatcher

        shapes = {t: node_shape(t, model.sizes, pairs.seq_len) for t in node_types}
        batches = block_batches(model, pairs.n_pairs, pairs.seq_len, shapes, self.batch_size, self.memory_gb)
        patcher = BlockPatcher(executor, pairs, node_types, direction, batches, cost)
        per_pair, info = self._search(
            model, pairs, node_types, lambda blocks, bar: patcher(blocks, advance=bar.update), executor.progress
        )
        return per_pair, {}, {**info, "base_metric": patcher.base_metric.tolist(), **patcher.info}

    def _search(
        self, model: Model, pairs: PromptPairs, node_types: list[str], patch: Any, progress: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Split blocks down from whole layers; ``patch(blocks, bar)`` gives their effects [n_blocks, P]."""
        n_pairs = pairs.n_pairs
        shapes = {t: node_shape(t, model.sizes, pairs.seq_len) for t in node_types}
        n_nodes = sum(model.n_layers * per_layer(shapes[t]) for t in node_types)
        budget = self.budget
        if budget is None and self.threshold is None:
            budget = math.ceil(n_nodes / 10)
        per_pair = {
            t: torch.zeros(n_pairs, model.n_layers, per_layer(shapes[t]), dtype=model.dtype) for t in node_types
        }
        round_size = max(self.branching, (self.batch_size or 256 * n_pairs) // n_pairs)
        heap: list[tuple[float, int, Block]] = []
        patched = 0
        tie = itertools.count()  # equal effects split in creation order

        def run(blocks: list[Block], bar: Any) -> None:
            nonlocal patched
            effects = patch(blocks, bar)
            patched += len(blocks)
            for block, effect in zip(blocks, effects):
                per_pair[block.node_type][:, block.layer, block.start : block.stop] = effect[:, None].to(model.dtype)
                size = float(effect.abs().mean())
                if block.size > 1 and (self.threshold is None or size > self.threshold):
                    heapq.heappush(heap, (-size, next(tie), block))

        roots = [Block(t, layer, 0, per_layer(shapes[t])) for t in node_types for layer in range(model.n_layers)]
        with progress_bar(0, "hierarchical", progress, unit="block") as bar:
            run(roots, bar)
            while heap:
                children: list[Block] = []
                while heap and len(children) < round_size:
                    split = _split(heap[0][2], self.branching)
                    if budget is not None and patched + len(children) + len(split) > budget:
                        heap.clear()
                        break
                    heapq.heappop(heap)
                    children += split
                if children:
                    run(children, bar)
        out = {t: v.reshape(n_pairs, *shapes[t]) for t, v in per_pair.items()}  # [P, L, R] -> [P, *layout]
        return out, {"blocks_patched": patched, "budget": budget}


def _split(block: Block, branching: int) -> list[Block]:
    """``branching`` contiguous children of nearly equal size (fewer when the block is smaller)."""
    parts = min(branching, block.size)
    bounds = [block.start + (block.size * k) // parts for k in range(parts + 1)]
    return [Block(block.node_type, block.layer, lo, hi) for lo, hi in zip(bounds, bounds[1:])]
