"""The gradient estimators on edges, batched over pairs: EAP, EAP-IG and edge AtP* (QK fix, GradDrop).

Every method class reaches them through ``estimate_edges`` (``AttributionPatching._attribute_edges``; the
points of ``atp+ig`` make it EAP-IG). A batch that runs out of accelerator memory is halved and retried
(``batching.BatchGuard``), as node batches are. Cost per pair: EAP's and EAP-IG's in ``edges.eap``, the
QK fix's and GradDrop's in ``edges.atpstar``; a batch retried after an out-of-memory error counts the
passes it completed before the error.

Shape letters: P pairs, N edges, T positions, S senders, R receivers, D d_model.
"""

from __future__ import annotations

from typing import Any

import torch

from ..batching import BatchGuard, Footprint, plan_batch
from ..errors import InputError
from ..gradients import AT_BASE, Points
from ..job import Job
from ..model import Model
from ..progress import progress_bar
from . import atpstar, eap
from .graph import graph_of
from .patching import edge_bytes
from .sites import head_out_weights


def estimate_edges(
    job: Job,
    *,
    batch_size: int | None,
    memory_gb: float,
    qk_fix: bool = False,
    grad_drop: bool = False,
    points: Points = AT_BASE,
    positions: bool = False,
    convention: str = "atpstar",
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
    """Edge AtP (EAP), its QK fix / GradDrop / AtP* forms, or EAP-IG (``points`` a path): [P, N]
    (``positions``: [P, N, T]), extras (with GradDrop ``"sign"``: int8, same shape, the sign of the estimate
    before GradDrop) and facts for ``info`` (``edge_oom_retries`` after an out-of-memory retry).
    ``convention``: the head-sender convention of post-norm models (``EdgeGraph.convention``)."""
    if (qk_fix or grad_drop) and not points.at_base:
        raise InputError(
            "the QK fix and GradDrop on edges take the gradient at the base run: use points=AT_BASE with them, "
            "or qk_fix=grad_drop=False on a path (EAP-IG)"
        )
    model, pairs = job.model, job.pairs
    graph, w_out = graph_of(model, convention), head_out_weights(model)
    shape = (pairs.n_pairs, graph.n_edges, *((pairs.seq_len,) if positions else ()))
    out = torch.zeros(shape, dtype=model.dtype)
    signs = torch.zeros(shape, dtype=torch.int8) if grad_drop else None
    guard = BatchGuard("edge attribution: pairs", model.device)
    footprint = _pair_footprint(model, graph.n_senders + graph.n_receivers, pairs.seq_len)
    guard.limit = plan_batch(footprint, memory_gb, model.device, batch_size=batch_size)

    def step(part: slice) -> None:
        index = torch.arange(part.start, part.stop)
        batch = eap.EdgeBatch(job, graph, w_out, index)
        if qk_fix or grad_drop:
            value, sign = atpstar.edge_atp(batch, qk_fix, grad_drop, positions)
            if signs is not None and sign is not None:
                signs[index] = sign.cpu()
        else:
            value = eap.eap(batch, points, positions)
        out[index] = value.detach().to(out.dtype).cpu()
        bar.update(len(index))

    with progress_bar(pairs.n_pairs, "edge attribution", job.progress, unit="pair") as bar:
        guard.run(pairs.n_pairs, step)
    extras = {"sign": signs} if signs is not None else {}
    return out, extras, ({"edge_oom_retries": guard.retries} if guard.retries else {})


def _pair_footprint(model: Model, n_vectors: int, seq_len: int) -> Footprint:
    """One pair: sender/receiver vectors [S + R, T, D] plus an autograd graph."""
    item = torch.finfo(model.dtype).bits // 8
    per_pair = (n_vectors * seq_len * model.d_model + 8 * model.n_layers * edge_bytes(model, seq_len) // item) * item
    return Footprint(per_pair)
