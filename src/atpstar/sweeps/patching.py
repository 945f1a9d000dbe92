"""Exact single-node patching on prepared runs: every node of some layers, or a list of nodes.

I(n) = L(M(x_base | do(n <- n(x_source)))) - L(M(x_base)), one patched forward per (node, pair),
started at the node's layer (``engine.sweep_layer`` batches the forwards). ``patch_layers`` is
exhaustive patching's share (a pair block x layers); verification's (a window of listed nodes) is
``engine.patch_listed``.

Shape letters: P pairs of the cache, N nodes, L layers.
"""

from __future__ import annotations

from typing import Any

import torch

from ..cost import Cost
from ..engine import MIN_CHUNK_TOKENS, PatchCache, sweep_layer
from ..model import Model
from ..nodes import layout_index, node_shape, unit_and_pos

# One (node, pair) element per entry: (type index, pair, head/kv-head/neuron, position), each [N].
Elements = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def patch_layers(
    model: Model,
    cache: PatchCache,
    node_types: list[str],
    layers: list[int],
    batch: int,
    cost: Cost,
    min_chunk_tokens: int = MIN_CHUNK_TOKENS,
    advance: Any = None,
) -> dict[str, torch.Tensor]:
    """Exact effects of every node of ``layers`` on every pair of ``cache`` (one work unit's share).

    Returns:
        node type -> [P, len(layers), *rest of layout] (layers in the order given).
    """
    effects = {
        t: torch.zeros(cache.n_pairs, *node_shape(t, model.sizes, cache.pairs.seq_len), dtype=cache.base_metric.dtype)
        for t in node_types
    }
    done = {t: torch.zeros(e.shape, dtype=torch.bool) for t, e in effects.items()}
    for layer in layers:
        pending = pending_nodes(node_types, done, layer)
        for chunk, effect in sweep_layer(model, cache, layer, node_types, pending, batch, cost, min_chunk_tokens):
            type_i, pair_i, unit_i, pos_i = (part[chunk] for part in pending)
            store_effects(node_types, effects, done, layer, (type_i, pair_i, unit_i, pos_i), effect)
            if advance is not None:
                advance(len(chunk))
    return {t: e[:, layers].cpu() for t, e in effects.items()}  # [P, L_unit, ...]


def pending_nodes(node_types: list[str], done: dict[str, torch.Tensor], layer: int) -> Elements:
    """Unfinished (node, pair) elements of all types at ``layer``: (type, pair, unit, pos) [N] each."""
    parts = []
    for i, node_type in enumerate(node_types):
        remaining = torch.nonzero(~done[node_type][:, layer])  # [n, 1 + len(layout) - 1] rows (pair, *layout[1:])
        pair, *rest = remaining.unbind(1)
        unit, pos = unit_and_pos(node_type, (layer, *rest))
        parts.append(torch.stack([torch.full_like(pair, i), pair, unit, pos], 1))
    type_i, pair_i, unit_i, pos_i = torch.cat(parts).unbind(1)
    return type_i, pair_i, unit_i, pos_i


def store_effects(
    node_types: list[str],
    effects: dict[str, torch.Tensor],
    done: dict[str, torch.Tensor],
    layer: int,
    elements: Elements,
    effect: torch.Tensor,
) -> None:
    """Write ``effect`` [N] of ``elements`` at ``layer`` into ``effects`` [P, *layout] and mark them ``done``."""
    type_i, pair_i, unit_i, pos_i = elements
    for i, node_type in enumerate(node_types):
        rows = type_i == i
        pair, unit, pos = pair_i[rows], unit_i[rows], pos_i[rows]
        layer_i = torch.full_like(pair, layer)
        index = (pair, *layout_index(node_type, layer_i, unit, pos))
        effects[node_type][index] = effect[rows].to(effects[node_type].dtype).cpu()
        done[node_type][index] = True
