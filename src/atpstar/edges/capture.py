"""Forward passes that record every sender's output and every receiver's input, and the gradients
of the metric at the receivers' inputs (each receiver as if it read its own copy of the residual).

A receiver's input is the residual stream it reads before its norm: ``resid_pre`` for q/k/v (and
for the MLP of a parallel block), ``resid_mid`` for a sequential MLP, the final residual stream for
``logits``. The gradient at a q/k/v receiver's private input is J^T g, with J the Jacobian of the
layer's norm, projection and rotary for that head, found by one backward through a copy of the
layer's input per receiver (the batch dimension holds the 3H copies).

Shape letters: B batch, S senders, R receivers, H heads, K kv-heads, T positions, E d_head, D d_model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model import Model
from ..runner import Run
from .graph import EdgeGraph
from .sites import head_outputs, layer_qkv, post_norm_share, ungroup


@dataclass
class SenderRun:
    """One forward pass seen through the edge graph.

    Attributes:
        senders: [B, S, T, D] every sender's output (MIB sender order).
        resid: L + 1 tensors [B, T, D]: residual stream entering each layer, then the final one.
        mlp_in: L tensors [B, T, D]: what each MLP's norm read (the m{l} receiver's input).
        final: [B, T, D] the final residual stream (a view of ``resid[-1]``).
        run: the runner's records (q, ungrouped k/v, pattern, z, mlp_in, mlp_out per layer).
    """

    senders: torch.Tensor
    resid: list[torch.Tensor]
    mlp_in: list[torch.Tensor]
    run: Run
    final: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.final = self.resid[-1]


def run_senders(
    model: Model,
    hidden: torch.Tensor,
    w_out: list[torch.Tensor],
    record: tuple[str, ...] = (),
    mlp_copy: bool = False,
    mib_heads: bool = False,
) -> SenderRun:
    """Forward from embeddings hidden [B, T, D]; records what the edge graph needs.

    Args:
        w_out: per layer W_O [H, E, D] (``sites.head_out_weights``).
        record: further runner sites to keep (``q``, ``k``, ``v``, ``pattern``); k and v are per query head.
        mlp_copy: give each MLP a private copy of its input, so its gradient counts the MLP path only.
        mib_heads: post-norm models: heads send W_O^h z_h before the norm (``EdgeGraph.convention`` "mib")
            rather than their share of the normalised write.
    """
    n_layers = model.n_layers
    ungrouped = ungroup(model.n_heads)

    def patch(layer: int, site: str, x: torch.Tensor, run: Run) -> torch.Tensor:
        if site == "mlp_in" and mlp_copy:
            return x.clone()  # a fresh autograd node: its gradient flows through the MLP only
        return ungrouped(layer, site, x, run)

    shares = ("attn_proj", "attn_out") if model.post_norm else ()
    run = Run(n_layers, record={"z", "resid_pre", "mlp_in", "mlp_out", *shares, *record}, patch=patch)
    model.run_layers(hidden, run)
    blocks = [hidden[:, None]]
    for layer in range(n_layers):
        # post-norm families: norm(a) / a per layer [B, T, D]
        share = None
        if shares and not mib_heads:
            share = post_norm_share(run.get("attn_proj", layer), run.get("attn_out", layer))
        blocks.append(head_outputs(run.records["z"][layer], w_out[layer], share))  # [B, H, T, D]
        blocks.append(run.records["mlp_out"][layer][:, None].to(hidden.device))
    senders = torch.cat([b.to(hidden.device) for b in blocks], 1)  # [B, S, T, D]
    return SenderRun(senders, list(run.records["resid_pre"]), list(run.records["mlp_in"]), run)


def qkv_input_grads(
    model: Model, layer: int, x: torch.Tensor, variants: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
) -> list[torch.Tensor]:
    """Gradients at each q/k/v receiver's private input, for several gradient variants.

    Args:
        x: [B, T, D] the layer's (clean) residual input.
        variants: (g_q, g_k, g_v), each [B, H, T, E] (k/v per query head): gradients at the sites.

    Returns:
        per variant [B, 3H, T, D]: receivers in MIB order (q of every head, then k, then v).
    """
    b, n_pos, d = x.shape
    heads, kv = model.n_heads, model.n_kv_heads
    group = heads // kv
    with torch.enable_grad():
        copies = x.detach()[:, None].expand(b, 3 * heads, n_pos, d).reshape(b * 3 * heads, n_pos, d)
        copies = copies.clone().requires_grad_(True)
        q, k, v = layer_qkv(model, layer, copies)  # [B*3H, H, T, E], [B*3H, K, T, E] x2
        out = []
        head = torch.arange(heads)
        for i, (g_q, g_k, g_v) in enumerate(variants):
            cot_q = torch.zeros(b, 3, heads, heads, n_pos, q.shape[-1], dtype=q.dtype, device=q.device)
            cot_k = torch.zeros(b, 3, heads, kv, n_pos, k.shape[-1], dtype=k.dtype, device=k.device)
            cot_v = torch.zeros_like(cot_k)
            cot_q[:, 0, head, head] = g_q.to(q.device, q.dtype)  # copy (q, h) feeds head h's query only
            cot_k[:, 1, head, head // group] = g_k.to(k.device, k.dtype)  # copy (k, h): head h's view of its kv head
            cot_v[:, 2, head, head // group] = g_v.to(v.device, v.dtype)
            (grad,) = torch.autograd.grad(
                (q, k, v),
                copies,
                grad_outputs=(cot_q.view_as(q), cot_k.view_as(k), cot_v.view_as(v)),
                retain_graph=i < len(variants) - 1,
            )
            out.append(grad.view(b, 3 * heads, n_pos, d))  # [B, 3H, T, D]
    return out


def receiver_grads(
    model: Model,
    graph: EdgeGraph,
    run: SenderRun,
    site_grads: dict[tuple[int, str], torch.Tensor],
    final_grad: torch.Tensor | None,
    layers: range,
) -> torch.Tensor:
    """Gradients at every receiver's input [B, R, T, D] from gradients at the sites of ``layers``.

    Receivers outside ``layers`` (and logits when ``final_grad`` is None) get zeros.

    Args:
        site_grads: (layer, site) -> gradient, sites ``q``, ``k``, ``v`` ([B, H, T, E]) and ``mlp_in`` ([B, T, D]).
        final_grad: [B, T, D] gradient at the final residual stream, or None.
    """
    x = run.resid[0]
    b, n_pos, d = x.shape
    out = torch.zeros(b, graph.n_receivers, n_pos, d, dtype=x.dtype, device=x.device)
    for layer in layers:
        first = graph.qkv_receiver(layer, "q", 0)
        variant = (site_grads[(layer, "q")], site_grads[(layer, "k")], site_grads[(layer, "v")])
        (grads,) = qkv_input_grads(model, layer, run.resid[layer], [variant])
        out[:, first : first + 3 * model.n_heads] = grads.to(out.device)
        out[:, graph.mlp_receiver(layer)] = site_grads[(layer, "mlp_in")].to(out.device)
    if final_grad is not None:
        out[:, graph.logits_receiver] = final_grad.to(out.device)
    return out
