"""Which edges make a circuit: the top k by score (signed or |score|, MIB's ``apply_topn``) and MIB's pruning.

Shape letters: S senders, R receivers, N edges.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .graph import EdgeGraph

__all__ = ["circuit_nodes", "prune_circuit", "receiver_owner", "top_edges"]


def top_edges(
    graph: EdgeGraph, scores: torch.Tensor, k: int, prune: bool = True, absolute: bool = True
) -> torch.Tensor:
    """bool [N]: the k edges with the largest |scores| [N] (``absolute=False``: largest signed scores;
    ties: edge order), pruned if asked."""
    if scores.shape != (graph.n_edges,):
        raise InputError(f"edge scores must have shape [{graph.n_edges}]; got {tuple(scores.shape)}")
    if not 0 <= k <= graph.n_edges:
        raise InputError(f"circuit size must lie in [0, {graph.n_edges}]; got {k}")
    key = scores.double().abs() if absolute else scores.double()
    order = torch.sort(key, descending=True, stable=True).indices
    chosen = torch.zeros(graph.n_edges, dtype=torch.bool)
    chosen[order[:k]] = True
    return prune_circuit(graph, chosen) if prune else chosen


def receiver_owner(graph: EdgeGraph) -> torch.Tensor:
    """[R] the sender node each receiver belongs to (-1 for logits): a{l}.h{h}<q|k|v> -> a{l}.h{h}, m{l} -> m{l}."""
    owner = torch.full((graph.n_receivers,), -1, dtype=torch.long)
    for layer in range(graph.n_layers):
        for head in range(graph.n_heads):
            for kind in ("q", "k", "v"):
                owner[graph.qkv_receiver(layer, kind, head)] = graph.head_sender(layer, head)
        owner[graph.mlp_receiver(layer)] = graph.mlp_sender(layer)
    return owner


def prune_circuit(graph: EdgeGraph, in_graph: torch.Tensor) -> torch.Tensor:
    """Drop edges whose sender has no incoming edge (except ``input``) or whose receiver's node has
    no outgoing edge (except ``logits``), until nothing changes. in_graph: bool [N] -> [N]."""
    owner = receiver_owner(graph)
    sender, receiver = graph.sender_index, graph.receiver_index
    edges = in_graph.clone()
    while True:
        has_out = torch.zeros(graph.n_senders, dtype=torch.bool)
        has_out[sender[edges]] = True
        has_in = torch.zeros(graph.n_senders, dtype=torch.bool)
        fed = owner[receiver[edges]]
        has_in[fed[fed >= 0]] = True
        has_in[0] = True  # input
        alive = has_out & has_in
        receiver_alive = torch.where(owner[receiver] >= 0, alive[owner[receiver].clamp(min=0)], True)
        kept = edges & alive[sender] & receiver_alive
        if torch.equal(kept, edges):
            return kept
        edges = kept


def circuit_nodes(graph: EdgeGraph, in_graph: torch.Tensor) -> list[str]:
    """Names of the nodes a circuit touches (senders of its edges, owners of its receivers, logits)."""
    owner = receiver_owner(graph)
    touched = set(graph.sender_index[in_graph].tolist()) | set(owner[graph.receiver_index[in_graph]].tolist())
    names = graph.sender_names
    return [names[s] for s in sorted(t for t in touched if t >= 0)] + (["logits"] if bool(in_graph.any()) else [])
