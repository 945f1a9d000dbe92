"""Blocks: patch contiguous blocks of nodes jointly; every node gets its block's effect (Kramár et al. 2024).

Î_block(n; pair) = L(M(x_base | do(block(n) <- source))) - L(M(x_base)), blocks of ``block_size``
contiguous nodes within one layer and node type, contiguous along the flattened per-layer layout
((head, pos) for attention nodes, (pos, neuron) for neurons). Fails when effects cancel in a block.
Cost: 2P full forwards, then per block and pair one forward started at the block's layer ((L - l) / L).

Shape letters: P pairs, B batch, L layers, R nodes per layer of one type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..batching import Footprint, plan_batch
from ..cost import Cost
from ..memory import cache_bytes, layout_elems, patched_forward_bytes
from ..model import Model
from ..nodes import node_shape
from ..pairs import PromptPairs
from ..sweeps.blocks import Block, per_layer
from ..validate import check_batching, check_count
from .base import Method, register
from .patched import PatchedForwards


class JointPatching(PatchedForwards):
    """A method that patches sets of nodes jointly, one bool mask of the layout per patched forward."""

    _attribute = Method._attribute_in_process  # its work units (``_attribute_on``), on the in-process executor

    def _sizes(self, model: Model, n_pairs: int, seq_len: int, node_types: list[str]) -> dict[str, Any]:
        nodes = layout_elems(model, node_types, seq_len)
        item = torch.finfo(model.dtype).bits // 8
        return {
            "n_items": n_pairs * nodes,
            "run_bytes": 0,
            "item_extra": nodes,
            "results_bytes": n_pairs * nodes * item,
        }


@register("blocks", summary="patch fixed blocks of nodes jointly; each node scored by its block's |effect|")
class Blocks(JointPatching):
    """Blocks: each node scored by the joint patching effect of its block.

    ``per_pair[t]`` [P, *layout] holds the signed block effect on each pair, repeated for every node of
    the block; ``scores`` the mean of its absolute value over pairs. The last block of a layer may
    be smaller.

    Args:
        block_size: nodes per block (contiguous in the flattened per-layer layout of one node type).
        batch_size: patched forwards per batch; None picks it from ``memory_gb``.
        memory_gb: bound on the run's memory besides the weights (cache, results, one batch).
    """

    aggregation = "mean_abs"
    distributable = True

    block_size: int = 16
    batch_size: int | None = None
    memory_gb: float = 1.0

    def expected_cost(self, model: Model, pairs: PromptPairs, node_types: list[str], info: Mapping[str, Any]) -> Cost:
        """2P full forwards, then one forward per block and pair started at the block's layer ((L - l) / L)."""
        cost = Cost()
        cost.add_forward(2 * pairs.n_pairs)
        for t in node_types:
            n_blocks = -(-per_layer(node_shape(t, model.sizes, pairs.seq_len)) // self.block_size)
            for layer in range(model.n_layers):
                cost.add_forward(pairs.n_pairs * n_blocks, start_layer=layer, n_layers=model.n_layers)
        return cost

    def _validate(self, model: Model, pairs: PromptPairs, node_types: list[str]) -> None:
        check_count("block_size", self.block_size)
        self.batch_size, self.memory_gb = check_batching(self.batch_size, self.memory_gb)

    def _attribute_on(
        self, executor: Any, model: Model, pairs: PromptPairs, node_types: list[str], direction: str, cost: Cost
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        from ..distributed.sweeps import BlockPatcher

        shapes, blocks = self._plan(model, pairs, node_types)
        batches = block_batches(model, pairs.n_pairs, pairs.seq_len, shapes, self.batch_size, self.memory_gb)
        patcher = BlockPatcher(executor, pairs, node_types, direction, batches, cost)
        effects = patcher(blocks, "blocks")
        return self._finish(model, pairs, node_types, shapes, blocks, effects, patcher.base_metric, patcher.info)

    def _plan(
        self, model: Model, pairs: PromptPairs, node_types: list[str]
    ) -> tuple[dict[str, tuple[int, ...]], list[Block]]:
        shapes = {t: node_shape(t, model.sizes, pairs.seq_len) for t in node_types}
        blocks = [
            Block(t, layer, start, min(start + self.block_size, per_layer(shapes[t])))
            for t in node_types
            for layer in range(model.n_layers)
            for start in range(0, per_layer(shapes[t]), self.block_size)
        ]
        return shapes, blocks

    def _finish(
        self,
        model: Model,
        pairs: PromptPairs,
        node_types: list[str],
        shapes: dict[str, tuple[int, ...]],
        blocks: list[Block],
        effects: torch.Tensor,
        base_metric: torch.Tensor,
        info: dict[str, Any],
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        per_pair = {
            t: torch.zeros(pairs.n_pairs, model.n_layers, per_layer(shapes[t]), dtype=model.dtype) for t in node_types
        }
        for block, effect in zip(blocks, effects):
            per_pair[block.node_type][:, block.layer, block.start : block.stop] = effect[:, None].to(model.dtype)
        per_pair = {t: v.reshape(pairs.n_pairs, *shapes[t]) for t, v in per_pair.items()}  # [P, L, R] -> [P, *layout]
        return per_pair, {}, {"n_blocks": len(blocks), "base_metric": base_metric.tolist(), **info}


def block_footprint(
    model: Model, n_pairs: int, seq_len: int, shapes: dict[str, tuple[int, ...]], node_type: str
) -> Footprint:
    """One patched forward with its bool mask over ``node_type``'s layout, beside the cache of ``n_pairs``."""
    mask_bytes = int(torch.Size(shapes[node_type]).numel())
    return Footprint(
        patched_forward_bytes(model, seq_len) + mask_bytes, held=cache_bytes(model, n_pairs, seq_len, list(shapes))
    )


def block_batches(
    model: Model,
    n_pairs: int,
    seq_len: int,
    shapes: dict[str, tuple[int, ...]],
    batch_size: int | None,
    memory_gb: float,
) -> dict[str, int]:
    """Patched forwards per batch for each node type's blocks (``batch_size``, else what fits ``memory_gb``)."""
    return {
        t: plan_batch(
            block_footprint(model, n_pairs, seq_len, shapes, t), memory_gb, model.device, batch_size=batch_size
        )
        for t in shapes
    }
