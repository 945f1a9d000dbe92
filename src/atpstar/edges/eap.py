"""Edge attribution patching (EAP) and EAP with integrated gradients (EAP-IG), consumers of the gradient step.

EAP (Syed et al. 2023; the edge form of AtP, Kramár et al. 2024 §3):
    Î(s -> r) = Σ_t (s(x_source) - s(x_base))_t · ∂L/∂x_r,t   at the base run,
with x_r the receiver's private copy of its residual input. All edges of a pair come from one
matrix product, sender differences [S, T·D] against receiver-input gradients [R, T·D].

EAP-IG (Hanna et al. 2024): the same sender differences against the receiver-input gradient averaged
over the points of a path (``gradients.path``: m runs whose input embeddings lie on the line from the
source to the base prompt, x_k = e(x_source) + (k / m)(e(x_base) - e(x_source)), k = 0 .. m - 1, EAP-IG's
own left Riemann schedule). The sender differences stay those of the real base and source runs. The
gradient at a q/k/v receiver's input passes through the point's own norm and projections, so each point's
receiver gradients are formed before they are summed.

The site gradients come from ``gradients.Tape`` (the backward every gradient estimator shares): it
watches every layer's q, k, v (per query head) and MLP-input copy and the final residual stream.

Cost per pair: EAP 2 forwards + 1 backward; EAP-IG 2 + m forwards and m backwards; each gradient
pass adds per layer one forward and backward of the layer's norm and q/k/v projections over 3H
copies of its input, counted by weight share: 3H x (q/k/v projection weights / layer weights)
forwards and backwards per pass (``sites.qkv_share``; about 4 for SmolLM2).

Shape letters: B batch, S senders, R receivers, N edges, L layers, T positions, D d_model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..cost import Cost
from ..gradients import Points, Tape
from ..job import Job
from ..model import Model
from .capture import SenderRun, receiver_grads, run_senders
from .graph import EdgeGraph
from .sites import qkv_share

# Sites whose gradients make up every receiver's input gradient.
GRAD_SITES = ("q", "k", "v", "mlp_in")
FINAL = "final"  # the watched final residual stream (the logits receiver's input), at layer L


@dataclass(frozen=True)
class EdgeBatch:
    """Pairs ``index`` of a job on the model's edge graph: what an edge estimator reads for one batch."""

    job: Job
    graph: EdgeGraph
    w_out: list[torch.Tensor]  # per layer W_O [H, E, D] (``sites.head_out_weights``)
    index: torch.Tensor  # [b] the pairs of this batch

    def tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(base tokens [b, T], source tokens [b, T]) of the batch's pairs."""
        base, source = self.job.base_and_source()
        return base[self.index], source[self.index]


def edge_scores(graph: EdgeGraph, delta: torch.Tensor, grads: torch.Tensor, positions: bool) -> torch.Tensor:
    """Σ over positions (and d_model) of delta · grads for every edge.

    Args:
        delta: [B, S, T, D] sender differences (source - base).
        grads: [B, R, T, D] gradients at the receivers' inputs.
        positions: keep positions apart.

    Returns:
        [B, N] (or [B, N, T] with ``positions``) in edge order.
    """
    delta = delta.to(grads.device, grads.dtype)
    if positions:
        per_pos = torch.einsum("bstd,brtd->bsrt", delta, grads)  # [B, S, R, T]
        return per_pos[:, graph.sender_index.to(grads.device), graph.receiver_index.to(grads.device)]  # [B, N, T]
    matrix = torch.bmm(delta.flatten(2), grads.flatten(2).transpose(1, 2))  # [B, S, T·D] x [B, T·D, R] -> [B, S, R]
    return graph.from_matrix(matrix)


def taped_run(
    batch: EdgeBatch, hidden: torch.Tensor, tape: Tape, record: tuple[str, ...] = ()
) -> tuple[SenderRun, torch.Tensor]:
    """A differentiable forward from embeddings hidden [B, T, D] whose receiver inputs ``tape`` watches.

    The tape gets (layer, site) for ``GRAD_SITES`` and ``record`` (e.g. ``pattern`` for the QK fix) at every
    layer, (L, ``FINAL``), and the residual stream for GradDrop. Returns (the run, metric [B]).
    """
    model, pairs = batch.job.model, batch.job.pairs
    hidden = hidden.detach().requires_grad_(True)
    mib_heads = batch.graph.mib_heads
    run = run_senders(model, hidden, batch.w_out, record=("q", "k", "v", *record), mlp_copy=True, mib_heads=mib_heads)
    metric = pairs.answer_metric(model, run.final, batch.index)
    tape.hidden, tape.resid = hidden, run.resid
    for layer in range(model.n_layers):
        for site in (*GRAD_SITES, *record):
            tape.watch(layer, site, run.mlp_in[layer] if site == "mlp_in" else run.run.records[site][layer])
    tape.watch(model.n_layers, FINAL, run.final)
    return run, metric


def collect(into: dict[tuple[int, str], torch.Tensor]) -> Callable[[int, str, torch.Tensor], None]:
    """A consumer that keeps every gradient it is handed, by (layer, site)."""

    def keep(layer: int, site: str, grad: torch.Tensor) -> None:
        into[(layer, site)] = grad

    return keep


def point_receiver_grads(batch: EdgeBatch, hidden: torch.Tensor, forwards: int = 0) -> tuple[SenderRun, torch.Tensor]:
    """One gradient run from hidden [B, T, D]: (the run, [B, R, T, D] gradients at every receiver's input).

    ``forwards`` passes are counted once the forward is done (before the backward, as the caller's base run).
    """
    model, sites = batch.job.model, dict[tuple[int, str], torch.Tensor]()
    tape = Tape(model.n_layers, batch.job.cost)
    try:
        run, metric = taped_run(batch, hidden, tape)
        if forwards:
            batch.job.cost.add_forward(forwards)
        tape.backward(metric, collect(sites))
    finally:
        tape.close()
    count_copies(model, batch.job.cost, len(batch.index))
    final = sites.pop((model.n_layers, FINAL))
    return run, receiver_grads(model, batch.graph, run, sites, final, range(model.n_layers))


def source_senders(
    model: Model, tokens: torch.Tensor, w_out: list[torch.Tensor], mib_heads: bool = False
) -> torch.Tensor:
    """[B, S, T, D] sender outputs of a forward on tokens (no gradients; ``mib_heads`` as ``run_senders``)."""
    with torch.no_grad():
        return run_senders(model, model.embed(tokens), w_out, mib_heads=mib_heads).senders


def eap(batch: EdgeBatch, points: Points, positions: bool = False) -> torch.Tensor:
    """EAP (``points`` at the base run) or EAP-IG (a path) scores [b, N] (or [b, N, T]) for the batch's pairs."""
    model, b = batch.job.model, len(batch.index)
    base_tokens, source_tokens = batch.tokens()
    source = source_senders(model, source_tokens, batch.w_out, batch.graph.mib_heads)
    with torch.enable_grad():
        base_embed = model.embed(base_tokens)
        if points.at_base:
            run, grads = point_receiver_grads(batch, base_embed, forwards=2 * b)
            base = run.senders.detach()
        else:
            with torch.no_grad():
                base = run_senders(model, base_embed, batch.w_out, mib_heads=batch.graph.mib_heads).senders
            source_embed = model.embed(source_tokens)
            total = torch.zeros(0)
            for k, point in enumerate(points.inputs(base_embed, source_embed)):
                _, grads = point_receiver_grads(batch, point)
                total = grads if k == 0 else total + grads
            grads = points.mean(total)
            batch.job.cost.add_forward((2 + points.n) * b)
    with torch.no_grad():
        return edge_scores(batch.graph, source - base, grads, positions)


def count_copies(model: Model, cost: Cost, b: int, fraction: float = 1.0) -> None:
    """The per-layer copies of norm + q/k/v projections: 3H prompts through the q/k/v share of
    ``fraction`` of the layers."""
    passes = 3 * model.n_heads * b * qkv_share(model) * fraction
    cost.forward += passes
    cost.backward += passes
