"""The edge forms of the registered methods: an exact sweep over every edge (resumable) and the
gradient estimators batched over pairs. Method classes call these from ``_attribute_edges``.

Position-resolved edges (``positions=True``, the methods' ``edge_positions`` option): edge s -> r at
position t carries only the sender's difference at residual position t (the sender's position, as
EAP-IG defines position-resolved edges); results gain a last axis [.., T].

Shape letters: P pairs, N edges, T positions.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..batching import Footprint, plan_batch
from ..checkpoint import CheckpointSchedule, load_checkpoint, save_checkpoint
from ..cost import Cost
from ..model import Model
from ..pairs import PromptPairs
from ..progress import progress_bar
from .atpstar import edge_atp
from .eap import eap
from .graph import graph_of
from .patching import edge_bytes, patch_edges, prepare_edges
from .sites import head_out_weights


def exact_edges(
    model: Model,
    pairs: PromptPairs,
    direction: str,
    cost: Cost,
    progress: bool,
    batch_size: int | None,
    memory_gb: float,
    checkpoint: str | None,
    positions: bool = False,
    made_by: dict[str, str] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Exact effect [P, N] (``positions``: [P, N, T]) of patching every edge alone.

    Partial results go to ``checkpoint`` (``atpstar.checkpoint``: saved on a schedule and on interrupt,
    resumed only by a run of the same ``made_by`` identity, a truncated file reported and recomputed);
    the cost reported after a resume is the saved part's plus this run's.
    """
    graph = graph_of(model)
    cache = prepare_edges(model, graph, pairs, direction, cost)
    prepared = Cost(cost.forward, cost.backward)  # base and source runs: paid again on every resume
    batch = plan_batch(edge_bytes(model, pairs.seq_len), memory_gb, model.device, batch_size=batch_size)
    shape = (pairs.n_pairs, graph.n_edges, *((pairs.seq_len,) if positions else ()))
    effects, done, prior = _resume(checkpoint, made_by or {}, shape, cache.base_metric.dtype)
    layer_of_edge = torch.tensor([graph.receiver_layer(r) for r in graph.receiver_index.tolist()])
    layer_of_item = layer_of_edge[:, None].expand(shape[1:]) if positions else layer_of_edge  # [N(, T)]
    schedule, total = CheckpointSchedule(), int((~done).sum())

    def save() -> None:
        if checkpoint:  # the saved part's cost: earlier runs' plus this run's patching
            spent = prior + Cost(cost.forward - prepared.forward, cost.backward - prepared.backward)
            tensors = {"effects/edge": effects, "done/edge": done.to(torch.uint8)}
            save_checkpoint(checkpoint, made_by or {}, tensors, spent)
            schedule.saved(int(done.sum()))

    try:
        with progress_bar(total, "exact edge patching", progress, unit="edge") as bar:
            for layer in range(model.n_layers + 1):
                todo = torch.nonzero(~done & (layer_of_item == layer)[None])  # [n, 2 or 3]: pair, edge(, pos)
                for start in range(0, len(todo), batch):
                    item = todo[start : start + batch]
                    p, e = item[:, 0], item[:, 1]
                    pos = item[:, 2] if positions else None
                    where = tuple(item.T)
                    effects[where] = patch_edges(model, cache, layer, p, e, cost, pos).to(effects.dtype).cpu()
                    done[where] = True
                    bar.update(len(p))
                    if checkpoint and schedule.due(int(done.sum()), done.numel()):
                        save()
    except BaseException:
        save()
        raise
    save()
    cost.forward += prior.forward  # the whole computation's cost, also after resuming
    cost.backward += prior.backward
    info: dict[str, Any] = {"base_metric": cache.base_metric.tolist()}
    if prior.forward_equivalents > 0:
        info["resumed_from"] = str(checkpoint)
    return effects, info


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


def _resume(
    path: str | None, made_by: dict[str, str], shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, Cost]:
    """(effects, done, cost of the saved part) from the checkpoint at ``path`` if it has one, else empty.

    Raises:
        IdentityMismatchError: the checkpoint is another computation's (model, pairs, metric, direction,
            options such as ``edge_positions``); the message names what differs.
    """
    effects = torch.zeros(shape, dtype=dtype)
    done = torch.zeros(shape, dtype=torch.bool)
    saved = load_checkpoint(path, made_by)  # warns and returns None for a truncated or corrupt file
    if saved is None:
        return effects, done, Cost()
    tensors, prior = saved
    if tensors.get("effects/edge") is None or tuple(tensors["effects/edge"].shape) != shape:
        warnings.warn(f"atpstar: checkpoint {path} holds no edge sweep of this shape; starting afresh", stacklevel=3)
        return effects, done, Cost()
    return tensors["effects/edge"].to(dtype), tensors["done/edge"].bool(), prior
