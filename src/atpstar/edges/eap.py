"""Edge attribution patching (EAP) and EAP with integrated gradients (EAP-IG).

EAP (Syed et al. 2023; the edge form of AtP, Kramár et al. 2024 §3):
    Î(s -> r) = Σ_t (s(x_source) - s(x_base))_t · ∂L/∂x_r,t   at the base run,
with x_r the receiver's private copy of its residual input. All edges of a pair come from one
matrix product, sender differences [S, T·D] against receiver-input gradients [R, T·D].

EAP-IG (Hanna et al. 2024): the same sender differences against the receiver-input gradient averaged
over ``ig_steps`` runs whose input embeddings lie on the line from the source to the base prompt,
    x_k = e(x_source) + (k / m)(e(x_base) - e(x_source)),  k = 0 .. m - 1,
which is EAP-IG's own schedule (left Riemann sum from the source end; m = 1 uses the source run's
gradient only). The sender differences stay those of the real base and source runs.

Cost per pair: EAP 2 forwards + 1 backward; EAP-IG 1 + m forwards and m backwards; each gradient
pass adds per layer one forward and backward of the layer's norm and q/k/v projections over 3H
copies of its input, counted by weight share: 3H x (q/k/v projection weights / layer weights)
forwards and backwards per pass (``sites.qkv_share``; about 4 for SmolLM2).

Shape letters: B batch, S senders, R receivers, N edges, L layers, T positions, D d_model.
"""

from __future__ import annotations

import torch

from ..cost import Cost
from ..model import Model
from ..pairs import PromptPairs
from .capture import SenderRun, receiver_grads, run_senders
from .graph import EdgeGraph
from .sites import qkv_share

# Sites whose gradients make up every receiver's input gradient.
GRAD_SITES = ("q", "k", "v", "mlp_in")


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


def gradient_run(
    model: Model,
    pairs: PromptPairs,
    index: torch.Tensor,
    hidden: torch.Tensor,
    w_out: list[torch.Tensor],
    record: tuple[str, ...] = (),
) -> tuple[SenderRun, torch.Tensor]:
    """A differentiable forward from embeddings hidden [B, T, D]: (the run, metric [B])."""
    hidden = hidden.detach().requires_grad_(True)
    run = run_senders(model, hidden, w_out, record=("q", "k", "v", *record), mlp_copy=True)
    metric = pairs.evaluate_metric(model.unembed(run.final[:, -1]), index.to(run.final.device))
    return run, metric


def site_tensors(run: SenderRun, n_layers: int) -> tuple[list[tuple[int, str]], list[torch.Tensor]]:
    """The gradient sites of every layer, as keys and tensors."""
    keys = [(layer, site) for layer in range(n_layers) for site in GRAD_SITES]
    tensors = [run.mlp_in[layer] if site == "mlp_in" else run.run.records[site][layer] for layer, site in keys]
    return keys, tensors


def plain_receiver_grads(
    model: Model, graph: EdgeGraph, run: SenderRun, metric: torch.Tensor, cost: Cost
) -> torch.Tensor:
    """[B, R, T, D] gradients of the metric at every receiver's private input (one backward)."""
    keys, tensors = site_tensors(run, model.n_layers)
    grads = torch.autograd.grad(metric.sum(), tensors + [run.final], allow_unused=True)
    site_grads = {k: _or_zero(g, t) for k, g, t in zip(keys, grads, tensors)}
    b = metric.shape[0]
    cost.add_backward(b)
    _count_copies(model, cost, b)
    return receiver_grads(model, graph, run, site_grads, _or_zero(grads[-1], run.final), range(model.n_layers))


def source_senders(model: Model, tokens: torch.Tensor, w_out: list[torch.Tensor]) -> torch.Tensor:
    """[B, S, T, D] sender outputs of a forward on tokens (no gradients)."""
    with torch.no_grad():
        return run_senders(model, model.embed(tokens), w_out).senders


def eap(
    model: Model,
    graph: EdgeGraph,
    pairs: PromptPairs,
    index: torch.Tensor,
    direction: str,
    w_out: list[torch.Tensor],
    cost: Cost,
    positions: bool = False,
    ig_steps: int | None = None,
) -> torch.Tensor:
    """EAP (``ig_steps`` None) or EAP-IG scores [b, N] (or [b, N, T]) for the pairs ``index``."""
    base_tokens, source_tokens = (tokens[index] for tokens in pairs.base_and_source(direction))
    b = len(index)
    source = source_senders(model, source_tokens, w_out)
    with torch.enable_grad():
        base_embed = model.embed(base_tokens)
        if ig_steps is None:
            run, metric = gradient_run(model, pairs, index, base_embed, w_out)
            cost.add_forward(2 * b)
            grads = plain_receiver_grads(model, graph, run, metric, cost)
            base = run.senders.detach()
        else:
            with torch.no_grad():
                base = run_senders(model, base_embed, w_out).senders
            source_embed = model.embed(source_tokens)
            grads = torch.zeros(0)
            for k in range(ig_steps):
                point = source_embed + (k / ig_steps) * (base_embed - source_embed)
                run, metric = gradient_run(model, pairs, index, point, w_out)
                step = plain_receiver_grads(model, graph, run, metric, cost)
                grads = step if k == 0 else grads + step
            grads = grads / ig_steps
            cost.add_forward((2 + ig_steps) * b)
    with torch.no_grad():
        return edge_scores(graph, source - base, grads, positions)


def _count_copies(model: Model, cost: Cost, b: int, fraction: float = 1.0) -> None:
    """The per-layer copies of norm + q/k/v projections: 3H prompts through the q/k/v share of
    ``fraction`` of the layers."""
    passes = 3 * model.n_heads * b * qkv_share(model) * fraction
    cost.forward += passes
    cost.backward += passes


def _or_zero(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad
