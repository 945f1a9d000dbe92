"""Forward passes with a set of edges patched to their source values: m(C) for a circuit C.

Every receiver r reads its current residual input plus Σ over its absent edges s -> r of
(s(x_source) - s_current), where s_current is the sender's output in this very pass (the convention
of MIB's and EAP-IG's circuit evaluation). With every edge absent each receiver reads the source run's
input, so m(∅) is the source run's metric; with none absent the pass is the base run.

Per layer, the q/k/v receivers that read a changed input get their own copy of it (through the
layer's norm and projection, as in exact edge patching); this happens inside the pass, at the
layer's query site, from the senders already computed.

Shape letters: B batch, S senders, R receivers, H heads, T positions, D d_model.
"""

from __future__ import annotations

import torch

from ..cost import Cost
from ..errors import InputError
from ..model import Model
from ..runner import Run, expand_kv
from .graph import EdgeGraph
from .patching import EdgeCache
from .sites import head_out_weights, head_outputs, layer_qkv, post_attention_norm, post_norm_share


def circuit_metric(
    model: Model, cache: EdgeCache, source: torch.Tensor, pair_index: torch.Tensor, absent: torch.Tensor, cost: Cost
) -> torch.Tensor:
    """Metric [B] of the base prompts ``pair_index`` [B] with the edges ``absent`` [B, S, R] patched.

    Args:
        cache: the base run (``patching.prepare_edges``).
        source: [P, S, T, D] sender outputs of the source run.
        absent: bool, True where an edge is patched to its source value (only valid edges may be set).
    """
    graph: EdgeGraph = cache.graph
    heads, n_layers = model.n_heads, model.n_layers
    absent = absent.to(torch.bool)
    used = absent.any(1)  # [B, R] receivers that read a changed input
    rows_by_layer = used.any(0)
    first = int(torch.nonzero(rows_by_layer)[0]) if bool(rows_by_layer.any()) else graph.n_receivers
    start = min(graph.receiver_layer(first), n_layers)
    src = source[pair_index]  # [B, S, T, D]
    current = cache.base_senders[pair_index].clone()  # senders before ``start`` keep their base outputs
    weight = absent.to(src.dtype)
    w_out = head_out_weights(model)
    replace: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    mib = graph.mib_heads  # heads reach receivers through their layer's post-attention norm (0019)
    norm_shift = _NormShift(model, graph, cache, pair_index, start, weight) if mib else None
    linear = norm_shift.linear_weight if norm_shift is not None else weight

    def shift(receivers: slice) -> torch.Tensor:
        """[B, r, T, D] Σ_s absent · (source_s - current_s) for a block of receivers (MIB heads: through the norm)."""
        out = torch.einsum("bsr,bstd->brtd", linear[:, :, receivers], src - current)
        return out if norm_shift is None else out + norm_shift(receivers, src - current)

    post_norm = model.post_norm and not mib  # heads send their share of the normalised write
    z_of: dict[int, torch.Tensor] = {}

    def set_heads(layer: int, share: torch.Tensor | None) -> None:
        block = slice(graph.head_sender(layer, 0), graph.head_sender(layer, 0) + heads)
        current[:, block] = head_outputs(z_of[layer], w_out[layer], share).to(current.dtype)

    def patch(layer: int, site: str, x: torch.Tensor, run: Run) -> torch.Tensor:
        if site == "attn_proj" and norm_shift is not None:
            norm_shift.attn_proj[layer] = x
            return x
        if site == "z":  # this layer's heads are now known: their current outputs (post-norm: after the norm)
            z_of[layer] = x
            if not post_norm:
                set_heads(layer, None)
            return x
        if site == "attn_out" and post_norm:
            set_heads(layer, post_norm_share(run.get("attn_proj", layer), x))
            return x
        if site == "mlp_in":
            return shift_mlp_input(layer, x)
        if site == "mlp_out":
            current[:, graph.mlp_sender(layer)] = x.to(current.dtype)
            return x
        if site not in ("q", "k", "v"):
            return x
        if site == "q":
            replace_qkv(layer, run)
        if site != "q":
            x = expand_kv(x, heads)  # per query head
        if site in replace:
            index, values = replace[site]
            x = x.index_put((index[0].to(x.device), index[1].to(x.device)), values.to(x.device, x.dtype))
        return x

    def replace_qkv(layer: int, run: Run) -> None:
        """The new q/k/v of this layer's receivers that read a changed input (one partial forward)."""
        replace.clear()
        q0 = graph.qkv_receiver(layer, "q", 0)
        block = slice(q0, q0 + 3 * heads)
        if not bool(used[:, block].any()):
            return
        resid = run.get("resid_pre", layer)  # [B, T, D]
        change = shift(block)  # [B, 3H, T, D]
        rows, recv = torch.nonzero(used[:, block], as_tuple=True)
        new_q, new_k, new_v = layer_qkv(model, layer, resid[rows] + change[rows, recv].to(resid.dtype))
        cost.forward += len(rows) / n_layers  # one layer's norm and projections per copy (upper bound)
        kinds = {"q": new_q, "k": expand_kv(new_k, heads), "v": expand_kv(new_v, heads)}
        for kind_i, kind in enumerate(("q", "k", "v")):
            sel = torch.nonzero(recv // heads == kind_i)[:, 0]
            if len(sel):
                head = recv[sel] % heads
                replace[kind] = torch.stack([rows[sel], head]), kinds[kind][sel, head]

    def shift_mlp_input(layer: int, x: torch.Tensor) -> torch.Tensor:
        receiver = graph.mlp_receiver(layer)
        if not bool(used[:, receiver].any()):
            return x
        return x + shift(slice(receiver, receiver + 1))[:, 0].to(x.device, x.dtype)

    with torch.no_grad():
        record = ("resid_pre", "attn_proj") if model.post_norm else ("resid_pre",)
        run = Run(n_layers, record=record, patch=patch, start_layer=start)
        final = model.run_layers(cache.resid[start][pair_index], run) if start < n_layers else None
        final = cache.resid[-1][pair_index] if final is None else final
        final = final + shift(slice(graph.logits_receiver, graph.logits_receiver + 1))[:, 0].to(final.dtype)
        cost.add_forward(len(pair_index), start_layer=start, n_layers=n_layers)
        return cache.pairs.answer_metric(model, final, pair_index)


class _NormShift:
    """MIB's absent head edges on a post-norm model: per upstream layer l, a receiver's input moves by
    norm_l(a_l + Σ_{absent h of l} (source_h - current_h)) - norm_l(a_l), a_l the layer's current
    Σ_h W_O^h z_h + b_O (``evaluate_graph`` of EAP-IG); other senders' differences add as they are."""

    def __init__(
        self,
        model: Model,
        graph: EdgeGraph,
        cache: EdgeCache,
        pair_index: torch.Tensor,
        start: int,
        weight: torch.Tensor,
    ) -> None:
        if cache.attn_proj is None:
            raise InputError("the edge cache lacks attn_proj: prepare it with the graph of the MIB head convention")
        self.model, self.graph, self.weight = model, graph, weight
        heads = torch.zeros(graph.n_senders, dtype=torch.bool)
        for layer in range(graph.n_layers):
            heads[graph.head_sender(layer, 0) : graph.head_sender(layer, 0) + graph.n_heads] = True
        self.linear_weight = weight * (~heads).to(weight.dtype)[None, :, None]  # [B, S, R] non-head senders
        # layers below the start keep their base writes; later ones are set as the pass computes them
        self.attn_proj = {layer: cache.attn_proj[layer][pair_index] for layer in range(start)}

    def __call__(self, receivers: slice, diff: torch.Tensor) -> torch.Tensor:
        """[B, r, T, D] the heads' part of the shift of a block of receivers; diff [B, S, T, D] source - current."""
        total = torch.zeros(diff.shape[0], receivers.stop - receivers.start, *diff.shape[2:], dtype=diff.dtype)
        for layer, a in self.attn_proj.items():
            first = self.graph.head_sender(layer, 0)
            block = slice(first, first + self.graph.n_heads)
            w = self.weight[:, block, receivers]  # [B, H, r]
            if not bool(w.any()):
                continue
            pre = torch.einsum("bhr,bhtd->brtd", w, diff[:, block])  # [B, r, T, D]
            a = a.to(pre.device, pre.dtype)[:, None]  # [B, 1, T, D]
            moved = post_attention_norm(self.model, layer, a + pre) - post_attention_norm(self.model, layer, a)
            total = total.to(moved.device) + moved.to(total.dtype)
        return total


def circuit_bytes(model: Model, graph: EdgeGraph, seq_len: int) -> int:
    """Rough memory of one element of a circuit forward (sender tables dominate)."""
    item = torch.finfo(model.dtype).bits // 8
    senders = 3 * graph.n_senders * seq_len * model.d_model
    return (senders + graph.n_senders * graph.n_receivers) * item + 3 * model.n_heads * seq_len * model.d_model * item
