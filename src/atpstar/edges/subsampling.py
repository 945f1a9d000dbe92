"""Subsampling over edges: random joint patches of edge subsets, the statistics of the false-negative bound.

Sample j on pair i patches a random subset of the edges at once (each edge that is not excluded is
in with probability p, from the sample's own generator, as node Subsampling): the receivers of the
patched edges read their sender's source output, every other edge stays clean (``circuit_run``: the
edges are the circuit's absent edges). The metric change Δ of that forward goes into per-edge running
(count, mean, M2) statistics of the samples with the edge in and with it out; mean_in - mean_out
estimates the edge's effect c(e) when edge effects add up (Kramár et al. 2024 §3.3 for nodes; the
same estimator over the edge graph). ``atpstar.false_negative_bound`` turns them into the bound.

Cost: 2P forwards for the base and source runs, then one forward per (sample, pair), started at the
layer of the first receiver that reads a changed input, plus the q/k/v copies of changed receivers
(as ``circuit_run`` counts them).

Shape letters: P pairs, B batch, S senders, R receivers, N edges.
"""

from __future__ import annotations

import torch

from ..cost import Cost
from ..model import Model
from ..pairs import PromptPairs
from ..progress import progress_bar
from ..sweeps.edges import edge_sample_batch, sample_edge_range
from ..sweeps.subsampling import SubsamplingStats
from .graph import graph_of
from .patching import prepare_edges


def subsample_edges(
    model: Model,
    pairs: PromptPairs,
    direction: str,
    *,
    samples: int,
    p: float,
    seed: int,
    cost: Cost,
    exclude: torch.Tensor | None = None,
    batch_size: int | None = None,
    memory_gb: float = 1.0,
    progress: bool = False,
) -> tuple[SubsamplingStats, torch.Tensor]:
    """In/out statistics of ``samples`` random joint edge patches per pair, and the base metric [P].

    Args:
        exclude: [N] bool, edges never patched (the verified ones); None: none.
        batch_size: joint patches per forward; None fits ``memory_gb``.

    Returns:
        (``SubsamplingStats`` with shapes ``{"edge": (N,)}``, base metric [P]).
    """
    graph = graph_of(model)
    keep = torch.ones(graph.n_edges, dtype=torch.bool) if exclude is None else ~exclude.to(torch.bool)
    cache = prepare_edges(model, graph, pairs, direction, cost)
    batch = edge_sample_batch(model, pairs.seq_len, memory_gb, batch_size)
    total = samples * pairs.n_pairs
    with progress_bar(total, "edge subsampling", progress, unit="sample") as bar:
        values = sample_edge_range(model, cache, 0, total, p=p, seed=seed, batch=batch, keep=keep, cost=cost,
                                   advance=bar.update)  # fmt: skip
    return SubsamplingStats({"edge": (graph.n_edges,)}, values), cache.base_metric.detach().double().cpu()


def joint_patch_cost(model: Model, keep: torch.Tensor, p: float) -> float:
    """Expected forward equivalents of one joint patch over the edges ``keep`` [N] at inclusion probability ``p``,
    as ``circuit_run`` counts them: at most one forward, plus 1/L per q/k/v receiver that reads a changed input
    (its own copy of the layer input through norm and projections)."""
    graph = graph_of(model)
    per_receiver = torch.bincount(graph.receiver_index[keep.to(torch.bool)], minlength=graph.n_receivers)  # [R]
    changed = 1.0 - (1.0 - p) ** per_receiver.double()  # [R] probability that a receiver reads a changed input
    receiver = torch.arange(graph.n_receivers)
    per_layer = 3 * model.n_heads + 1  # receivers of one layer: q, k, v of every head, then the MLP
    qkv = (receiver // per_layer < model.n_layers) & (receiver % per_layer < 3 * model.n_heads)
    return 1.0 + float(changed[qkv].sum()) / model.n_layers
