"""Joint patching of blocks of nodes: one forward per (block, pair) patches the whole block at once.

A ``Block`` is a run of contiguous nodes within one layer and node type, contiguous along the
flattened per-layer layout ((head, pos) for attention nodes, (pos, neuron) for neurons). Used by
``methods.blocks`` and ``methods.hierarchical``, in-process or as ``distributed`` work units.

Shape letters: P pairs, B batch, L layers, R nodes per layer of one type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from ..batching import BatchGuard
from ..cost import Cost
from ..engine import PatchCache, patch_masks
from ..model import Model


class Block(NamedTuple):
    """Nodes ``start``..``stop``-1 of the flattened per-layer layout of ``node_type`` at ``layer``."""

    node_type: str
    layer: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def per_layer(shape: tuple[int, ...]) -> int:
    """Nodes per layer of a layout [L, a, b]."""
    return int(shape[1] * shape[2])


def patch_blocks(
    model: Model,
    cache: PatchCache,
    blocks: list[Block],
    shapes: dict[str, tuple[int, ...]],
    batches: Mapping[str, int],
    cost: Cost,
    advance: Any = None,
) -> torch.Tensor:
    """Effects [n_blocks, P] of patching each block jointly on each pair.

    Forwards are grouped by (node type, layer), so every batch starts at its blocks' own layer.
    """
    n_pairs = cache.n_pairs
    effects = torch.zeros(len(blocks), n_pairs, dtype=torch.float64)
    groups: dict[tuple[str, int], list[int]] = {}
    guard = BatchGuard("blocks: patched forwards", model.device)
    for i, block in enumerate(blocks):
        groups.setdefault((block.node_type, block.layer), []).append(i)
    for (node_type, layer), members in groups.items():
        batch = batches[node_type]
        members = sorted(members, key=lambda i: blocks[i].start)  # similar first positions share a batch
        block_i = torch.tensor(members).repeat_interleave(n_pairs)  # one element per (block, pair)
        pair_i = torch.arange(n_pairs).repeat(len(members))
        for start in range(0, len(block_i), batch):
            chunk_blocks, chunk_pairs = block_i[start : start + batch], pair_i[start : start + batch]
            mask = torch.zeros(len(chunk_blocks), *shapes[node_type], dtype=torch.bool)
            flat = mask.view(len(chunk_blocks), shapes[node_type][0], -1)  # [B, L, R]
            for row, i in enumerate(chunk_blocks.tolist()):
                flat[row, layer, blocks[i].start : blocks[i].stop] = True
            effect = patch_masks(model, cache, {node_type: mask}, chunk_pairs, cost, guard)
            effects[chunk_blocks, chunk_pairs] = effect.detach().double().cpu()
            if advance is not None:
                advance(len(chunk_blocks))
    return effects
