"""The gradient estimators over edges, batched over pairs (``estimate_edges``, from the methods'
``_attribute_edges``); the exact edge sweep and edge subsampling are work units (``atpstar.sweeps.edges``).

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
from .graph import graph_of
from .patching import edge_bytes
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
