"""Exact edge patching: the ground truth for every edge estimator.

Patching edge s -> r: receiver r reads clean_r + (s(x_source) - s(x_base)) — its own copy of its
residual input, through its layer's norm and projection — while every other receiver reads its
clean input; everything downstream of r is recomputed as usual. The effect is the metric change.

Edges are patched many per forward along the batch dimension, grouped by the receiver's layer, and
each forward starts at that layer from the cached base run. A q/k/v receiver's input first goes
through a partial forward of its layer (norm, projection, rotary) to give the head its new q, k or
v; an MLP receiver's input is changed at its ``mlp_in`` site (in front of its norm, for the MLP alone); a
``logits`` receiver needs only the unembedding (counted as no forward).

Shape letters: P pairs, B batch, S senders, N edges, H heads, T positions, D d_model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cost import Cost
from ..model import Model
from ..pairs import PromptPairs
from ..runner import Run, expand_kv
from .capture import run_senders
from .graph import EdgeGraph
from .sites import head_out_weights, layer_qkv, post_attention_norm


@dataclass
class EdgeCache:
    """The base run every patched forward starts from, and every sender's difference.

    Attributes:
        resid: L + 1 tensors [P, T, D]: residual stream entering each layer, then the final one.
        mlp_in: L tensors [P, T, D]: each MLP receiver's clean input.
        delta: [P, S, T, D] sender outputs of the source run minus the base run.
        base_metric: [P].
        attn_proj: MIB's head convention on a post-norm model (``EdgeGraph.mib_heads``): L tensors
            [P, T, D], each layer's base Σ_h W_O^h z_h + b_O before its norm; else None.
        head_delta: with ``attn_proj``: [P, S, T, D] what one patched edge adds to its receiver's input:
            norm(a + Δ_h) - norm(a) for a head h (MIB's ``evaluate_graph``), Δ_s for other senders.
    """

    graph: EdgeGraph
    resid: list[torch.Tensor]
    mlp_in: list[torch.Tensor]
    base_senders: torch.Tensor
    delta: torch.Tensor
    base_metric: torch.Tensor
    pairs: PromptPairs
    attn_proj: list[torch.Tensor] | None = None
    head_delta: torch.Tensor | None = None

    @property
    def edge_delta(self) -> torch.Tensor:
        """[P, S, T, D] the change one patched edge brings its receiver (``delta`` unless ``head_delta``)."""
        return self.delta if self.head_delta is None else self.head_delta


def prepare_edges(model: Model, graph: EdgeGraph, pairs: PromptPairs, direction: str, cost: Cost) -> EdgeCache:
    """Run base and source prompts once each (2P forwards) and keep what patched forwards need."""
    base_tokens, source_tokens = pairs.base_and_source(direction)
    w_out = head_out_weights(model)
    mib = graph.mib_heads
    with torch.no_grad():
        base = run_senders(model, model.embed(base_tokens), w_out, mib_heads=mib)
        source = run_senders(model, model.embed(source_tokens), w_out, mib_heads=mib)
        base_metric = pairs.answer_metric(model, base.final, torch.arange(pairs.n_pairs))
    cost.add_forward(2 * pairs.n_pairs)
    delta = source.senders - base.senders
    cache = EdgeCache(graph, base.resid, base.mlp_in, base.senders, delta, base_metric, pairs)
    if mib:
        cache.attn_proj = list(base.run.records["attn_proj"])
        cache.head_delta = through_post_norms(model, graph, cache.attn_proj, delta)
    return cache


def through_post_norms(
    model: Model, graph: EdgeGraph, attn_proj: list[torch.Tensor], delta: torch.Tensor
) -> torch.Tensor:
    """[P, S, T, D] ``delta`` with each head's row norm(a_l + Δ_h) - norm(a_l) (a_l: attn_proj [P, T, D])."""
    out = delta.clone()
    with torch.no_grad():
        for layer, a in enumerate(attn_proj):
            first = graph.head_sender(layer, 0)
            heads = slice(first, first + graph.n_heads)
            a = a.to(delta.device)
            moved = post_attention_norm(model, layer, a[:, None] + delta[:, heads])  # [P, H, T, D]
            out[:, heads] = moved - post_attention_norm(model, layer, a)[:, None]
    return out


def patch_edges(
    model: Model,
    cache: EdgeCache,
    layer: int,
    pair_index: torch.Tensor,
    edge_index: torch.Tensor,
    cost: Cost,
    pos_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Effects [B] of patching one edge per batch element; all receivers read at ``layer`` (L: logits).

    Args:
        pair_index: [B] the pair of each element.
        edge_index: [B] the edge (in edge order) of each element.
        pos_index: [B] patch only this position of the sender's difference (position-resolved edges).
    """
    graph = cache.graph
    sender = graph.sender_index[edge_index]
    receiver = graph.receiver_index[edge_index]
    delta = cache.edge_delta[pair_index, sender]  # [B, T, D]
    if pos_index is not None:
        keep = (
            torch.arange(delta.shape[1], device=delta.device)[None, :] == pos_index.to(delta.device)[:, None]
        )  # [B, T]
        delta = delta * keep[..., None].to(delta.dtype)
    with torch.no_grad():
        if layer == model.n_layers:
            final = cache.resid[-1][pair_index] + delta
            return _metric_change(model, cache, final, pair_index)
        hidden = cache.resid[layer][pair_index]  # [B, T, D]
        offset = receiver - graph.qkv_receiver(layer, "q", 0)  # 0 .. 3H (3H: the MLP)
        heads = model.n_heads
        replace: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        rows = torch.nonzero(offset < 3 * heads)[:, 0]
        if len(rows):
            new_q, new_k, new_v = layer_qkv(model, layer, hidden[rows] + delta[rows].to(hidden.device))
            cost.add_forward(len(rows), start_layer=model.n_layers - 1, n_layers=model.n_layers)
            new = {"q": new_q, "k": expand_kv(new_k, heads), "v": expand_kv(new_v, heads)}  # [b, H, T, E]
            for kind_i, kind in enumerate(("q", "k", "v")):
                chosen = torch.nonzero(offset[rows] // heads == kind_i)[:, 0]
                if len(chosen):
                    head = offset[rows][chosen] % heads
                    replace[kind] = (rows[chosen], head, new[kind][chosen, head])  # values [c, T, E]
        mlp_rows = offset == 3 * heads
        mlp_delta = delta * mlp_rows[:, None, None].to(delta.dtype)

        def patch(at_layer: int, site: str, x: torch.Tensor, run: Run) -> torch.Tensor:
            if at_layer != layer:
                return x
            if site == "mlp_in":  # the MLP receivers' own copy of their input
                return x + mlp_delta.to(x.device, x.dtype) if bool(mlp_rows.any()) else x
            if site not in ("q", "k", "v"):
                return x
            if site != "q":
                x = expand_kv(x, heads)  # per query head, so one head's k/v can change alone
            if site not in replace:
                return x
            row, head, values = replace[site]
            return x.index_put((row.to(x.device), head.to(x.device)), values.to(x.device, x.dtype))

        final = model.run_layers(hidden, Run(model.n_layers, patch=patch, start_layer=layer))
        cost.add_forward(len(pair_index), start_layer=layer, n_layers=model.n_layers)
        return _metric_change(model, cache, final, pair_index)


def _metric_change(model: Model, cache: EdgeCache, final: torch.Tensor, pair_index: torch.Tensor) -> torch.Tensor:
    metric = cache.pairs.answer_metric(model, final, pair_index)  # [B]
    return metric - cache.base_metric[pair_index].to(metric.device)


def edge_bytes(model: Model, seq_len: int) -> int:
    """Rough memory of one patched-edge forward element."""
    s = model.sizes
    item = torch.finfo(model.dtype).bits // 8
    return seq_len * (8 * s.d_model + 3 * s.d_mlp + 3 * s.n_heads * seq_len + 6 * s.n_heads * s.d_head) * item
