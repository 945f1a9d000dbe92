"""Edge AtP with the QK fix and GradDrop (edge AtP*), the edge forms of Kramár et al. 2024 §4-§5.

- QK fix at a query receiver a{l}.h{h}<q>: the head's new queries q' = q(norm(x + Δ_s)) are exact,
  and so is its new attention pattern A' = softmax(q' kᵀ); the estimate is Σ (A' - A) · ∂L/∂A over
  the head's pattern. At a key receiver <k>: the head sees keys k' = k(norm(x + Δ_s)) (its own view
  of its kv head), A' = softmax(q k'ᵀ). Value, MLP and logits receivers keep the plain EAP estimate.
- GradDrop: Î_l(s -> r) is the estimate with layer l's residual write held constant in the backward
  pass; the score is Σ_{l=0}^{L-1} |Î_l| / (L - 1). Dropping a layer below the receiver's leaves its
  gradient unchanged, dropping the receiver's own layer gives 0 (a logits receiver sits at layer L),
  so only layers above the receiver need a backward, each run from that layer down (``gradients.Tape``'s
  partial backwards, the ones node GradDrop uses; the site gradients come from the same tape as EAP's).
  GradDrop's score has no sign; the sign of the estimate before GradDrop (QK-fixed with the fix) is
  returned beside it, for MIB's signed ranking (``edges.mib.mib_scores``, design record 0029).

Position-resolved (``positions``; edge s -> r at the sender's position t, only Δ_s,t reaches r): the
plain estimate keeps the sum over d_model only. A query change at t moves row t of the pattern alone, so
the QK fix of a query receiver splits exactly into rows (its sum over t is the position-summed fix). A
key change at t moves every row; each position gets its own exact softmax with only key t changed
(the sum over t is not the position-summed fix, which changes all keys at once). GradDrop takes |.|
per position.

Cost per pair: as EAP, plus for the QK fix per layer one partial forward (norm + q/k/v) over one copy
of the layer input per upstream sender, and for GradDrop L - 1 partial backwards and, per dropped
layer, the receiver-copy backwards of the layers below it.

Shape letters: B batch, S senders, R receivers, N edges, L layers, H heads, T positions, D d_model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..gradients import Tape
from ..ops import attention_pattern, graddrop_combine, one_key_patterns
from ..runner import expand_kv
from .capture import SenderRun, receiver_grads
from .eap import FINAL, EdgeBatch, collect, count_copies, source_senders, taped_run
from .sites import layer_qkv, qkv_share


def edge_atp(
    batch: EdgeBatch, qk_fix: bool, grad_drop: bool, positions: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Edge AtP with the QK fix and/or GradDrop for the batch's pairs: ([b, N] (``positions``: [b, N, T]),
    with GradDrop the int8 sign of the estimate before GradDrop, same shape; else None)."""
    model, cost = batch.job.model, batch.job.cost
    base_tokens, source_tokens = batch.tokens()
    source = source_senders(model, source_tokens, batch.w_out, batch.graph.mib_heads)
    sites: dict[tuple[int, str], torch.Tensor] = {}
    tape = Tape(model.n_layers, cost, grad_drop)
    try:
        with torch.enable_grad():
            run, metric = taped_run(batch, model.embed(base_tokens), tape, ("pattern",) if qk_fix else ())
            cost.add_forward(2 * len(batch.index))
            tape.backward(metric, collect(sites))
            final = sites.pop((model.n_layers, FINAL))  # [B, T, D] ∂L/∂resid_L: the logits receiver's input
            with torch.no_grad():
                delta = source.to(run.final.device) - run.senders.detach()  # [B, S, T, D]
                patterns = _new_patterns(batch, run, delta, positions) if qk_fix else {}
            fixed = _Estimates(batch, run, delta, patterns, positions)
            plain = fixed.of(sites, final, range(model.n_layers))
            if not grad_drop:
                return fixed.edges(plain), None
            return fixed.edges(fixed.graddrop(tape, plain)), fixed.edges(plain.sign()).to(torch.int8)
    finally:
        tape.close()


@dataclass
class _Estimates:
    """One batch's base run, sender differences and QK-fix patterns: estimates from any set of site gradients."""

    batch: EdgeBatch
    run: SenderRun
    delta: torch.Tensor  # [B, S, T, D] source - base sender outputs
    patterns: dict[tuple[int, str], torch.Tensor]  # (layer, q|k) -> A' - A (``_new_patterns``); empty: no fix
    positions: bool

    def of(
        self, sites: dict[tuple[int, str], torch.Tensor], final_grad: torch.Tensor | None, layers: range
    ) -> torch.Tensor:
        """[B, S, R] (``positions``: [B, T, S, R]) estimates of every (sender, receiver) from site gradients
        of ``layers`` (+ logits)."""
        model, graph, delta = self.batch.job.model, self.batch.graph, self.delta
        grads = receiver_grads(model, graph, self.run, sites, final_grad, layers)  # [B, R, T, D]
        count_copies(model, self.batch.job.cost, delta.shape[0], len(layers) / model.n_layers)
        with torch.no_grad():
            if self.positions:
                matrix = torch.einsum("bstd,brtd->btsr", delta, grads)  # [B, T, S, R]
            else:
                matrix = torch.bmm(delta.flatten(2), grads.flatten(2).transpose(1, 2))  # [B, S, R]
            for layer in layers:
                for kind in ("q", "k"):
                    if (layer, kind) in self.patterns:
                        self._fix(matrix, layer, kind, sites[(layer, "pattern")])
            return matrix * graph.valid.to(matrix.device)

    def _fix(self, matrix: torch.Tensor, layer: int, kind: str, grad: torch.Tensor) -> None:
        """Write the QK fix Σ (A' - A) · ∂L/∂A (grad [B, H, T, T]) into the query or key receivers of ``layer``."""
        change = self.patterns[(layer, kind)]  # [B, S_l, H, T, T]; positions, k: [B, S_l, T, H, T, T]
        if not self.positions:
            fixed = torch.einsum("bshqk,bhqk->bsh", change, grad)  # [B, S_l, H]
        elif kind == "q":
            fixed = torch.einsum("bshqk,bhqk->bqsh", change, grad)  # [B, T, S_l, H]: row q = position q
        else:
            fixed = torch.einsum("bsphqk,bhqk->bpsh", change, grad)  # [B, T, S_l, H]: key p changed
        first = self.batch.graph.qkv_receiver(layer, kind, 0)
        matrix[..., : change.shape[1], first : first + self.batch.job.model.n_heads] = fixed

    def graddrop(self, tape: Tape, plain: torch.Tensor) -> torch.Tensor:
        """ĉ = Σ_l |Î_l| / (L - 1) from the plain estimates [B, (T,) S, R] and the tape's dropped backwards."""
        graph = self.batch.graph
        layer_of = torch.tensor([graph.receiver_layer(r) for r in range(graph.n_receivers)], device=plain.device)
        total = plain.abs() * layer_of.to(plain.dtype)  # the layers below each receiver leave it unchanged
        dropped: dict[tuple[int, str], torch.Tensor] = {}
        for drop in tape.dropped(collect(dropped)):  # the sites of layers < drop, with layer drop's write dropped
            total = total + self.of(dropped, None, range(drop)).abs() * (layer_of < drop).to(plain.dtype)
            dropped.clear()
        return graddrop_combine(total, self.batch.job.model.n_layers)

    def edges(self, matrix: torch.Tensor) -> torch.Tensor:
        """[B, S, R] -> [B, N]; position-resolved [B, T, S, R] -> [B, N, T]."""
        edges = self.batch.graph.from_matrix(matrix)  # [B, N] or [B, T, N]
        return edges.transpose(1, 2) if self.positions else edges


def _new_patterns(
    batch: EdgeBatch, run: SenderRun, delta: torch.Tensor, positions: bool = False
) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, q|k) -> [B, S_l, H, T, T]: A' - A of every head when one upstream sender's difference
    reaches its query (q) or its key (k) input, exact through norm, projection, rotary and softmax.

    With ``positions``, (layer, k) is [B, S_l, T, H, T, T]: A' - A with the key of one position p changed
    (norm, projection and rotary act per position, so k' at p is the same as when all positions change).
    """
    model, graph, cost = batch.job.model, batch.graph, batch.job.cost
    out = {}
    b, _, n_pos, d = delta.shape
    for layer in range(model.n_layers):
        n_up = graph.senders_before(graph.qkv_receiver(layer, "q", 0))
        x = run.resid[layer].detach()[:, None] + delta[:, :n_up]  # [B, S_l, T, D]
        new_q, new_k, _ = layer_qkv(model, layer, x.reshape(b * n_up, n_pos, d))  # [B*S_l, H|K, T, E]
        cost.forward += b * n_up * qkv_share(model) / model.n_layers
        args = model.attention_args[layer]  # scaling, soft-cap and window of this layer
        q = run.run.records["q"][layer].detach()  # [B, H, T, E]
        k = run.run.records["k"][layer].detach()  # [B, H, T, E] (per query head)
        pattern = run.run.records["pattern"][layer].detach()[:, None]  # [B, 1, H, T, T]
        q_rep = q[:, None].expand(b, n_up, *q.shape[1:]).reshape(b * n_up, *q.shape[1:])  # [B*S_l, H, T, E]
        k_rep = k[:, None].expand(b, n_up, *k.shape[1:]).reshape(b * n_up, *k.shape[1:])  # [B*S_l, H, T, E]
        with_q = attention_pattern(new_q, k_rep, args.scaling, args.softcap, args.window)  # [B*S_l, H, T, T]
        with_k = attention_pattern(q_rep, new_k, args.scaling, args.softcap, args.window)
        per_sender = (b, n_up, *pattern.shape[2:])
        out[(layer, "q")] = with_q.view(per_sender) - pattern  # [B, S_l, H, T, T]
        out[(layer, "k")] = with_k.view(per_sender) - pattern  # [B, S_l, H, T, T]
        if positions:
            new_k = expand_kv(new_k, model.n_heads)  # [B*S_l, H, T, E]
            one_key = one_key_patterns(q_rep, k_rep, new_k, args.scaling, args.softcap, args.window)
            per_key = (b, n_up, n_pos, *pattern.shape[2:])
            out[(layer, "k")] = one_key.view(per_key) - pattern[:, :, None]  # [B, S_l, T, H, T, T]
    return out
