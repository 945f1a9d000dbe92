"""Verification of an edge estimate: exact edge patching in the estimate's order (``atpstar.verify``
dispatches here for attributions with edges).

Shape letters: N verified edges, P pairs.
"""

from __future__ import annotations

from typing import Any

import torch

from ..batching import plan_batch
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
    positioned = estimate.scores["edge"].ndim == 2  # position-resolved edges [N, T]
    n_pos = estimate.scores["edge"].shape[-1] if positioned else 1
    scores = estimate.scores["edge"].double().flatten()  # [N·T]: edge n at position t is n·T + t
    order = torch.sort(scores.abs(), descending=True, stable=True).indices
    n = len(order)
    if threshold is not None:
        n = int((scores.abs() >= threshold).sum())
    if budget is not None:
        n = min(n, budget)
    chosen = order[:n]
    edges, pos = chosen // n_pos, chosen % n_pos
    cost = Cost()
    cache = prepare_edges(model, graph, pairs, direction, cost)
    batch = plan_batch(edge_bytes(model, pairs.seq_len), 1.0, model.device, batch_size=batch_size)
    effects = torch.zeros(n, pairs.n_pairs, dtype=torch.float64)
    layer_of = torch.tensor([graph.receiver_layer(r) for r in graph.receiver_index[edges].tolist()], dtype=torch.long)
    with progress_bar(n * pairs.n_pairs, "verify edges", progress, unit="edge") as bar:
        for layer in layer_of.unique().tolist():
            rank = torch.nonzero(layer_of == layer)[:, 0].repeat_interleave(pairs.n_pairs)
            pair = torch.arange(pairs.n_pairs).repeat(int((layer_of == layer).sum()))
            for start in range(0, len(rank), batch):
                r, p = rank[start : start + batch], pair[start : start + batch]
                at = pos[r] if positioned else None
                effects[r, p] = patch_edges(model, cache, layer, p, edges[r], cost, at).double().cpu()
                bar.update(len(r))
    return Verification(
        nodes=[("edge", (int(e), int(t)) if positioned else (int(e),)) for e, t in zip(edges.tolist(), pos.tolist())],
        effects=effects,
        estimate_scores=scores[chosen].clone(),
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
            "n_nodes": graph.n_edges * n_pos,
            "edge_graph": estimate.info["edge_graph"],
        },
    )
