"""The graph JSON of an edge result: MIB's nodes laid out by layer, its top edges, and its circuits by size.

The shape is the viewer's graph format (``atpstar.viewer.check_graph``): nodes are MIB's senders
(``input``, ``a{l}.h{h}``, ``m{l}``) and ``logits``; an edge goes from its sender to the node that owns
its receiver (``a1.h0<q>`` belongs to ``a1.h0``), with ``kind`` q, k, v, mlp or logits. A circuit of
size x is the top ⌊x·N⌋ edges by MIB's signed score, pruned: the set ``faithfulness_curve`` patches for CPR, so
the drawn edge count at a slider position is the curve's ``n_edges`` there (up to ``max_drawn``).

Shape letters: P pairs, N edges, S senders, T positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..edges.circuits import MIB_FRACTIONS, receiver_owner, signed_importance, top_edges
from ..edges.graph import EdgeGraph
from .page import json_number as _number

MAX_DRAWN = 1000  # edges drawn per circuit size at most (a larger circuit shows its strongest edges)


def edge_graph_json(
    estimate: Any,
    *,
    curve: Any = None,
    verified: Any = None,
    fractions: Sequence[float] | None = None,
    prune: bool = True,
    max_drawn: int = MAX_DRAWN,
    title: str = "",
) -> dict[str, Any]:
    """The viewer's graph of an ``Attribution`` with edge scores (``nodes=["edge"]``).

    Args:
        estimate: the result; its ``info["edge_graph"]`` fixes the graph.
        curve: its ``FaithfulnessCurve`` (gives the sizes and f at each), or None (f unknown).
        verified: a verification of some of its edges (their exact effects are shown), or None.
        fractions: circuit sizes when there is no curve (default MIB's).
        prune: prune circuits as MIB does (as the curve was made).
        max_drawn: most edges drawn at one size.

    Returns:
        A dict in the viewer's graph format, ready for ``json.dumps``.
    """
    graph = EdgeGraph.from_description(estimate.info["edge_graph"])
    per_pair = estimate.per_pair["edge"].double()
    per_pair = per_pair.sum(2) if per_pair.ndim == 3 else per_pair  # [P, N, T] -> [P, N]: MIB's circuits
    scores = _aggregate(per_pair, estimate.aggregation)  # [N]
    sizes = list(curve.fractions) if curve is not None else list(fractions or MIB_FRACTIONS)
    ranking = signed_importance(estimate)  # [N] the curve's CPR circuits rank by MIB's signed score (0019)
    circuits = [top_edges(graph, ranking, int(x * graph.n_edges), prune, absolute=False) for x in sizes]
    drawn, members = _drawn_edges(scores, circuits, max_drawn)
    exact = _exact_edges(verified)
    names, owner = graph.edge_names, receiver_owner(graph)
    node_names = graph.node_names
    edges = []
    for edge in drawn:
        target = int(owner[graph.receiver_index[edge]])
        item = {
            "source": node_names[int(graph.sender_index[edge])],
            "target": node_names[target] if target >= 0 else "logits",
            "weight": _number(scores[edge]),
            "name": names[edge],
            "kind": _kind(names[edge]),
        }
        if edge in exact:
            item["exact"] = exact[edge]
        edges.append(item)
    return {
        "format": "atpstar-graph",
        "version": 1,
        "title": title or f"{estimate.method} edges",
        "meta": _meta(estimate, graph, prune),
        "score_label": "score",
        "nodes": _nodes(graph, per_pair, estimate.aggregation),
        "edges": edges,
        "circuits": [_circuit(i, x, circuits[i], members[i], curve) for i, x in enumerate(sizes)],
    }


def _aggregate(per_pair: torch.Tensor, aggregation: str) -> torch.Tensor:
    """[P, ...] -> [...]: the result's own aggregation over pairs."""
    return per_pair.abs().mean(0) if aggregation == "mean_abs" else per_pair.mean(0)


def _drawn_edges(
    scores: torch.Tensor, circuits: list[torch.Tensor], max_drawn: int
) -> tuple[list[int], list[list[int]]]:
    """(edges to draw, in rank order; per circuit the positions of its drawn edges in that list)."""
    order = torch.sort(scores.abs(), descending=True, stable=True).indices  # [N] edge ids by rank
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    chosen_ranks = []
    for chosen in circuits:
        ranks = torch.sort(rank[chosen.nonzero()[:, 0]]).values[:max_drawn]  # strongest first
        chosen_ranks.append(ranks)
    union = sorted(set(torch.cat(chosen_ranks).tolist())) if chosen_ranks else []
    position = {r: i for i, r in enumerate(union)}
    drawn = [int(order[r]) for r in union]
    return drawn, [[position[r] for r in ranks.tolist()] for ranks in chosen_ranks]


def _exact_edges(verified: Any) -> dict[int, float | None]:
    """Edge id -> exact effect (mean over pairs) of the position-summed edges a verification patched."""
    if verified is None:
        return {}
    effects = torch.as_tensor(verified.effects).double()  # [n_verified, P]
    found = {}
    for row, (_, index) in enumerate(verified.nodes):
        if len(index) == 1:  # per-position edges have no single exact effect of the summed edge
            found[int(index[0])] = _number(effects[row].mean())
    return found


def _nodes(graph: EdgeGraph, per_pair: torch.Tensor, aggregation: str) -> list[dict[str, Any]]:
    """Senders and logits with their layer (MLPs half a layer after their layer's heads), x and score.

    A sender's score aggregates over pairs the sum of its outgoing edges' per-pair scores (for a
    gradient estimate, the sender's own node score); logits sums its incoming edges.
    """
    out_sum = torch.zeros(per_pair.shape[0], graph.n_senders, dtype=torch.float64)  # [P, S]
    out_sum.index_add_(1, graph.sender_index, per_pair)
    into_logits = graph.receiver_index == graph.logits_receiver
    logits = per_pair[:, into_logits].sum(1, keepdim=True)  # [P, 1]
    node_scores = _aggregate(torch.cat([out_sum, logits], 1), aggregation)  # [S + 1]
    columns = graph.n_heads + 1  # heads left to right, the MLP in a column of its own on the right
    places: list[tuple[float, str, int | None, float]] = [(-1.0, "input", None, 0.5)]
    for layer in range(graph.n_layers):
        places += [(float(layer), "head", h, (h + 0.5) / columns) for h in range(graph.n_heads)]
        places.append((layer + 0.5, "mlp", None, (columns - 0.5) / columns))
    places.append((float(graph.n_layers), "logits", None, 0.5))
    return [
        {"id": name, "name": name, "layer": layer, "x": x, "kind": kind, "index": unit, "score": _number(node_scores[i])}
        for i, (name, (layer, kind, unit, x)) in enumerate(zip(graph.node_names, places))
    ]


def _circuit(i: int, fraction: float, chosen: torch.Tensor, members: list[int], curve: Any) -> dict[str, Any]:
    n_edges = int(chosen.sum())
    f = curve.faithfulness[i] if curve is not None else None
    return {"fraction": fraction, "n_edges": n_edges, "faithfulness": None if f is None else _number(f), "edges": members}


def _meta(estimate: Any, graph: EdgeGraph, prune: bool) -> dict[str, Any]:
    return {
        "model": estimate.model_id,
        "method": estimate.method,
        "direction": estimate.direction,
        "metric": estimate.metric,
        "edges in graph": graph.n_edges,
        "pruned as MIB": prune,
    }


def _kind(edge_name: str) -> str:
    """q, k or v for an edge into an attention input, else mlp or logits."""
    receiver = edge_name.split("->", 1)[1]
    if receiver.endswith(">"):
        return receiver[-2]
    return "logits" if receiver == "logits" else "mlp"
