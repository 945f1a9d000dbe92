"""Verification of an edge estimate: exact edge patching in the estimate's order (``atpstar.verify``
dispatches here for attributions with edges).

Shape letters: N verified edges, P pairs.
"""

from __future__ import annotations

from typing import Any

import torch

from ..cost import Cost
from ..errors import InputError
from ..model import Model
from ..pairs import PromptPairs
from ..progress import progress_bar
from .graph import graph_of
from .patching import edge_bytes, patch_edges, prepare_edges


def verify_edges(
    model: Model,
    pairs: PromptPairs,
    estimate: Any,
    budget: int | None,
    threshold: float | None,
    direction: str,
    batch_size: int | None,
    progress: bool,
) -> Any:
    """Exact effects of the edges ``estimate`` ranks highest: a ``Verification`` with nodes ``("edge", (i,))``."""
    from ..verify import Verification

    graph = graph_of(model)
    if estimate.edge_graph() != graph:
        raise InputError(
            f"the estimate's edge graph {estimate.info['edge_graph']} is not this model's; verify on its model"
        )
    scores = estimate.scores["edge"].double()
    order = torch.sort(scores.abs(), descending=True, stable=True).indices
    n = len(order)
    if threshold is not None:
        n = int((scores.abs() >= threshold).sum())
    if budget is not None:
        n = min(n, budget)
    edges = order[:n]
    cost = Cost()
    cache = prepare_edges(model, graph, pairs, direction, cost)
    batch = batch_size or max(1, int(2**30 // edge_bytes(model, pairs.seq_len)))
    effects = torch.zeros(n, pairs.n_pairs, dtype=torch.float64)
    layer_of = torch.tensor([graph.receiver_layer(r) for r in graph.receiver_index[edges].tolist()], dtype=torch.long)
    with progress_bar(n * pairs.n_pairs, "verify edges", progress, unit="edge") as bar:
        for layer in layer_of.unique().tolist():
            rank = torch.nonzero(layer_of == layer)[:, 0].repeat_interleave(pairs.n_pairs)
            pair = torch.arange(pairs.n_pairs).repeat(int((layer_of == layer).sum()))
            for start in range(0, len(rank), batch):
                r, p = rank[start : start + batch], pair[start : start + batch]
                effects[r, p] = patch_edges(model, cache, layer, p, edges[r], cost).double().cpu()
                bar.update(len(r))
    return Verification(
        nodes=[("edge", (int(e),)) for e in edges.tolist()],
        effects=effects,
        estimate_scores=scores[edges].clone(),
        node_types=["edge"],
        direction=direction,
        metric=pairs.metric_name,
        model_id=model.model_id,
        cost=cost,
        base_metric=cache.base_metric.detach().double().cpu(),
        info={
            "estimate_method": estimate.method,
            "budget": budget,
            "threshold": threshold,
            "n_nodes": graph.n_edges,
            "edge_graph": estimate.info["edge_graph"],
        },
    )
