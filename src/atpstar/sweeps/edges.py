"""Edge engines on prepared runs: exact patching of the edges read at one layer, and random joint
patches of edge subsets (the statistics of the false-negative bound over edges).

Exact edge patching of s -> r: the receiver r reads its own copy of the layer input with the sender's
difference added (``edges.patching.patch_edges``); one forward per (edge, pair), started at the
receiver's layer, in batches of ``batch`` elements. A (pair block, layer) is a work unit's share.

Edge subsampling: sample j on pair i patches a random subset of the edges at once (each kept edge in
with probability p, from the sample's own generator, as node Subsampling; ``edges.circuit_run``);
any range of (sample, pair) elements is a work unit's share, merged with ``ops.welford_merge``.

Shape letters: P pairs of the cache, N edges (of the layer), T positions, B batch, S senders, R receivers.
"""

from __future__ import annotations

from typing import Any

import torch

from ..batching import plan_batch
from ..cost import Cost
from ..edges.circuit_run import circuit_bytes, circuit_metric
from ..edges.graph import EdgeGraph, graph_of
from ..edges.patching import EdgeCache, patch_edges, prepare_edges
from ..model import Model
from ..pairs import PromptPairs
from .subsampling import RUNNING, random_subset, update_stats


def prepare_edge_sweep(
    model: Model, pairs: PromptPairs, direction: str, node_types: list[str], cost: Cost, convention: str = "atpstar"
) -> EdgeCache:
    """The base and source runs of an edge sweep (2P forwards), as ``engine.prepare`` is a node sweep's;
    ``convention``: the head senders of post-norm models (``EdgeGraph.convention``)."""
    return prepare_edges(model, graph_of(model, convention), pairs, direction, cost)


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


def edge_sample_batch(model: Model, seq_len: int, memory_gb: float, batch_size: int | None = None) -> int:
    """Joint edge patches per forward: ``batch_size``, else as many circuit runs as fit ``memory_gb``."""
    return plan_batch(circuit_bytes(model, graph_of(model), seq_len), memory_gb, model.device, batch_size=batch_size)


def sample_edge_range(
    model: Model,
    cache: EdgeCache,
    start: int,
    stop: int,
    *,
    p: float,
    seed: int,
    batch: int,
    keep: torch.Tensor,
    cost: Cost,
    advance: Any = None,
) -> dict[str, torch.Tensor]:
    """Statistics of elements ``start``..``stop``-1 (element = sample x P + pair) in batches of ``batch`` from
    ``start``; ranges merge with ``ops.welford_merge`` (a work unit's share).

    Args:
        keep: [N] bool, the edges that may be patched.

    Returns:
        ``count_in``, ``mean_in``, ``m2_in`` and the same for ``out``, each [P, N] float64.
    """
    graph = cache.graph
    n_edges, n_pairs = graph.n_edges, cache.pairs.n_pairs
    source = (cache.base_senders + cache.delta).contiguous()  # [P, S, T, D] sender outputs of the source run
    base_metric = cache.base_metric.detach().double().cpu()  # [P]
    values = {name: torch.zeros(n_pairs, n_edges, dtype=torch.float64) for name in RUNNING}
    for first in range(start, stop, batch):
        element = torch.arange(first, min(first + batch, stop))
        pair_index, sample_index = element % n_pairs, element // n_pairs
        chosen = torch.stack(
            [random_subset(n_edges, p, seed, int(j), int(s)) for j, s in zip(pair_index, sample_index)]
        )  # [B, N]
        chosen &= keep
        absent = graph.to_matrix(chosen).bool()  # [B, N] -> [B, S, R]
        metric = circuit_metric(model, cache, source, pair_index, absent, cost)  # [B]
        delta = metric.detach().double().cpu() - base_metric[pair_index]  # [B]
        update_stats(values, chosen, delta, pair_index, n_pairs)
        if advance is not None:
            advance(len(element))
    return values
