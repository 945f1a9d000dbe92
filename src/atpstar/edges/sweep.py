"""The edge forms of the registered methods: the exact sweep's share of a (pair block, receiver layer)
work unit (``patch_edge_layer``; ``atpstar.distributed`` runs the units, in-process or on workers) and
the gradient estimators batched over pairs (``estimate_edges``, from the methods' ``_attribute_edges``).

Exact edge patching of s -> r: the receiver r reads its own copy of the layer input with the sender's
difference added (``patching.patch_edges``); one forward per (edge, pair), started at the receiver's
layer, in batches of ``batch`` elements.

Position-resolved edges (``positions=True``, the methods' ``edge_positions`` option): edge s -> r at
position t carries only the sender's difference at residual position t (the sender's position, as
EAP-IG defines position-resolved edges); results gain a last axis [.., T].

Shape letters: P pairs, N edges, T positions.
"""

from __future__ import annotations

from typing import Any

import torch

from ..batching import Footprint, plan_batch
from ..cost import Cost
from ..model import Model
from ..pairs import PromptPairs
from ..progress import progress_bar
from .atpstar import edge_atp
from .eap import eap
from .graph import EdgeGraph, graph_of
from .patching import EdgeCache, edge_bytes, patch_edges, prepare_edges
from .sites import head_out_weights


def estimate_edges(
    model: Model,
    pairs: PromptPairs,
    direction: str,
    cost: Cost,
    progress: bool,
    batch_size: int | None,
    memory_gb: float,
    qk_fix: bool = False,
    grad_drop: bool = False,
    ig_steps: int | None = None,
    positions: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Edge AtP (EAP), its QK fix / GradDrop / AtP* forms, or EAP-IG: [P, N] (``positions``: [P, N, T])."""
    graph = graph_of(model)
    w_out = head_out_weights(model)
    shape = (pairs.n_pairs, graph.n_edges, *((pairs.seq_len,) if positions else ()))
    out = torch.zeros(shape, dtype=model.dtype)
    footprint = _pair_footprint(model, graph.n_senders + graph.n_receivers, pairs.seq_len)
    batch = plan_batch(footprint, memory_gb, model.device, batch_size=batch_size)
    with progress_bar(pairs.n_pairs, "edge attribution", progress, unit="pair") as bar:
        for start in range(0, pairs.n_pairs, batch):
            index = torch.arange(start, min(start + batch, pairs.n_pairs))
            if qk_fix or grad_drop:
                value = edge_atp(model, graph, pairs, index, direction, w_out, cost, qk_fix, grad_drop, positions)
            else:
                value = eap(model, graph, pairs, index, direction, w_out, cost, positions, ig_steps)
            out[index] = value.detach().to(out.dtype).cpu()
            bar.update(len(index))
    return out, {}


def _pair_footprint(model: Model, n_vectors: int, seq_len: int) -> Footprint:
    """One pair: sender/receiver vectors [S + R, T, D] plus an autograd graph."""
    item = torch.finfo(model.dtype).bits // 8
    return Footprint(
        (n_vectors * seq_len * model.d_model + 8 * model.n_layers * edge_bytes(model, seq_len) // item) * item
    )


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
