"""Exact edge patching on prepared runs: every edge whose receiver reads at one layer, alone.

Edge s -> r: the receiver r reads its own copy of the layer input with the sender's difference added
(``edges.patching.patch_edges``); one forward per (edge, pair), started at the receiver's layer, in
batches of ``batch`` elements. A (pair block, layer) is a work unit's share of the exact edge sweep.

Shape letters: P pairs of the cache, N edges (of the layer), T positions.
"""

from __future__ import annotations

from typing import Any

import torch

from ..cost import Cost
from ..edges.graph import EdgeGraph, graph_of
from ..edges.patching import EdgeCache, patch_edges, prepare_edges
from ..model import Model
from ..pairs import PromptPairs


def prepare_edge_sweep(
    model: Model, pairs: PromptPairs, direction: str, node_types: list[str], cost: Cost
) -> EdgeCache:
    """The base and source runs of an edge sweep (2P forwards), as ``engine.prepare`` is a node sweep's."""
    return prepare_edges(model, graph_of(model), pairs, direction, cost)


def receiver_layers(graph: EdgeGraph) -> torch.Tensor:
    """The layer each edge's receiver reads at (L: the logits): [N] over all edges."""
    return torch.tensor([graph.receiver_layer(r) for r in graph.receiver_index.tolist()])


def patch_edge_layer(
    model: Model, cache: EdgeCache, layer: int, batch: int, positions: bool, cost: Cost, advance: Any = None
) -> torch.Tensor:
    """Exact effects of the edges read at ``layer``, each alone, on every pair of ``cache``.

    Args:
        positions: patch one sender position at a time (position-resolved edges).

    Returns:
        [P, N_layer] (``positions``: [P, N_layer, T]) in edge order, N_layer the edges whose receiver
        reads at ``layer``.
    """
    graph = cache.graph
    n_pairs, seq_len = cache.pairs.n_pairs, cache.pairs.seq_len
    shape = (n_pairs, graph.n_edges, *((seq_len,) if positions else ()))
    at_layer = receiver_layers(graph) == layer  # [N]
    items = at_layer[:, None].expand(shape[1:]) if positions else at_layer  # [N(, T)]
    effects = torch.zeros(shape, dtype=cache.base_metric.dtype)
    todo = torch.nonzero(items[None].expand(shape))  # [n, 2 or 3]: pair, edge(, pos)
    for start in range(0, len(todo), batch):
        item = todo[start : start + batch]
        pos = item[:, 2] if positions else None
        effect = patch_edges(model, cache, layer, item[:, 0], item[:, 1], cost, pos)
        effects[tuple(item.T)] = effect.to(effects.dtype).cpu()
        if advance is not None:
            advance(len(item))
    return effects[:, at_layer]  # [P, N, ...] -> [P, N_layer, ...]
