"""Brute-force edge references from plain module hooks on the ``transformers`` model (no atpstar engine).

Definitions (per pair, per edge s -> r, receiver r reading at layer l):

- f_r(shift): metric of the base prompt where receiver r's input is its residual input in this run
  plus ``shift``: for a q/k/v receiver of head h, head h's q/k/v slice of the projection output is
  recomputed from norm(layer input + shift) (a forward hook on the projection; pre-rotary, which is
  the same intervention as post-rotary at the same position); for m{l}, shift is added in front of
  the MLP norm; for logits, in front of the final norm.
- exact(s -> r) = f_r(Δ_s) - f_r(0), Δ_s = s(source) - s(base) from hooks on the output projection
  input (per-head z, times that head's W_O slice, no bias) and on the MLP output.
- EAP(s -> r) = d/dε f_r(ε Δ_s) at ε = 0, by autograd on ε (one ε per batch element).
- with ``drop_layer``: layer drop's residual write is detached (GradDrop's Î_l).
- with ``hidden0``: the residual stream entering layer 0 is replaced (EAP-IG's interpolated inputs).
- with ``position`` t: Δ_s is zero outside residual position t (position-resolved edges).

Grouped-query models are brute-forced on an ungrouped copy (k/v projection rows repeated per query
head), where every query head has its own key/value projection.

Shape letters: N edges (batch), T positions, D d_model, H heads, E d_head.
"""

from __future__ import annotations

from typing import Any

import torch

from .hooks import _layers, _module, metric_of, reference_copy

_PRE_NORMS = ("input_layernorm", "post_attention_layernorm", "norm")
NORMS = {"gpt2": ("ln_1", "ln_2", "ln_f"), "gpt_neox": ("input_layernorm", "post_attention_layernorm", "final_layer_norm"),
         "llama": _PRE_NORMS, "mistral": _PRE_NORMS, "qwen2": _PRE_NORMS, "qwen3": _PRE_NORMS, "phi3": _PRE_NORMS,
         "gemma2": ("input_layernorm", "pre_feedforward_layernorm", "norm"),
         "gemma3_text": ("input_layernorm", "pre_feedforward_layernorm", "norm"),
         "olmo2": (None, "mlp", "norm")}  # OLMo-2: no norm in front of attention or MLP
# Post-norm families: the norm between the attention / MLP output and the residual stream.
POST_NORMS = {"gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
              "gemma3_text": ("post_attention_layernorm", "post_feedforward_layernorm"),
              "olmo2": ("post_attention_layernorm", "post_feedforward_layernorm")}


def _ungroup_fused(attn: Any, n_heads: int, n_kv: int) -> None:
    """Phi-3: rebuild qkv_proj [q heads | k heads | v heads] with the k and v rows repeated per query head."""
    e, old = attn.head_dim, attn.qkv_proj
    group = n_heads // n_kv
    q, k, v = old.weight.split([n_heads * e, n_kv * e, n_kv * e], 0)
    rows = [q] + [w.view(n_kv, e, -1).repeat_interleave(group, 0).reshape(n_heads * e, -1) for w in (k, v)]
    new = torch.nn.Linear(old.in_features, 3 * n_heads * e, bias=old.bias is not None, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(torch.cat(rows, 0))
        if old.bias is not None:
            qb, kb, vb = old.bias.split([n_heads * e, n_kv * e, n_kv * e])
            new.bias.copy_(torch.cat([qb] + [b.view(n_kv, e).repeat_interleave(group, 0).flatten() for b in (kb, vb)]))
    attn.qkv_proj = new
    attn.num_key_value_heads = n_heads


def ungrouped_copy(hf_model: Any, attn_implementation: str | None = None) -> Any:
    """A reference copy whose every query head has its own key/value projection (same function)."""
    ref = reference_copy(hf_model, attn_implementation)
    cfg = ref.config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    if n_kv == n_heads:
        return ref
    group = n_heads // n_kv
    for layer in _layers(ref):
        attn = layer.self_attn
        e = attn.head_dim
        if cfg.model_type == "phi3":
            _ungroup_fused(attn, n_heads, n_kv)
            attn.num_key_value_groups = 1
            continue
        for name in ("k_proj", "v_proj"):
            old = getattr(attn, name)
            new = torch.nn.Linear(old.in_features, n_heads * e, bias=old.bias is not None, dtype=old.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(old.weight.view(n_kv, e, -1).repeat_interleave(group, 0).reshape(n_heads * e, -1))
                if old.bias is not None:
                    new.bias.copy_(old.bias.view(n_kv, e).repeat_interleave(group, 0).flatten())
            setattr(attn, name, new)
        if cfg.model_type == "olmo2":  # k_norm over the whole k projection: repeat its weight with the rows
            with torch.no_grad():
                attn.k_norm.weight = torch.nn.Parameter(attn.k_norm.weight.view(n_kv, e).repeat_interleave(group, 0).flatten())
        attn.num_key_value_groups = 1
    cfg.num_key_value_heads = n_heads
    return ref


def _final_norm(ref: Any) -> Any:
    kind = ref.config.model_type
    base = getattr(ref, {"gpt2": "transformer", "gpt_neox": "gpt_neox"}.get(kind, "model"))
    return getattr(base, NORMS[kind][2])


def _qkv_slices(ref: Any, layer: Any, normed: torch.Tensor) -> dict[str, torch.Tensor]:
    """Projection outputs of normed [N, T, D] as q/k/v [N, T, H, E] (Llama: pre-rotary)."""
    cfg = ref.config
    h = cfg.num_attention_heads
    e = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
    kind = cfg.model_type
    if kind == "gpt2":
        out = layer.attn.c_attn(normed).view(*normed.shape[:2], 3, h, e)
        return {"q": out[:, :, 0], "k": out[:, :, 1], "v": out[:, :, 2]}
    if kind == "phi3":  # ungrouped fused rows [q heads | k heads | v heads]
        out = layer.self_attn.qkv_proj(normed).view(*normed.shape[:2], 3, h, e)
        return {"q": out[:, :, 0], "k": out[:, :, 1], "v": out[:, :, 2]}
    if kind == "gpt_neox":
        out = layer.attention.query_key_value(normed).view(*normed.shape[:2], h, 3, e)
        return {"q": out[:, :, :, 0], "k": out[:, :, :, 1], "v": out[:, :, :, 2]}
    a = layer.self_attn
    if kind == "olmo2":  # QK-norm over the whole projection: the head's q/k come from its own copy's norm
        out = {"q": a.q_norm(a.q_proj(normed)), "k": a.k_norm(a.k_proj(normed)), "v": a.v_proj(normed)}
        return {c: out[c].view(*normed.shape[:2], h, e) for c in "qkv"}
    return {c: getattr(a, f"{c}_proj")(normed).view(*normed.shape[:2], h, e) for c in "qkv"}


def _patch_projection(ref: Any, layer_module: Any, kind: str, out: torch.Tensor, rows: list[int], heads: list[int],
                      new: dict[str, torch.Tensor]) -> torch.Tensor:
    """Write new[kind][i] into head heads[i] of element rows[i] of a projection output."""
    cfg = ref.config
    h = cfg.num_attention_heads
    e = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
    out = out.clone()
    n, t = out.shape[:2]
    model_type = cfg.model_type
    for i, (row, head) in enumerate(zip(rows, heads)):
        if model_type in ("gpt2", "phi3"):
            view = out.view(n, t, 3, h, e)[:, :, "qkv".index(kind)]
        elif model_type == "gpt_neox":
            view = out.view(n, t, h, 3, e)[:, :, :, "qkv".index(kind)]
        else:
            view = out.view(n, t, h, e)
        view[row, :, head] = new[kind][i]
    return out


def receiver_metric(ref: Any, tokens: torch.Tensor, answer: torch.Tensor, distractor: torch.Tensor, metric: Any,
                    receivers: list[tuple[str, int, int]], shifts: torch.Tensor, drop_layer: int | None = None,
                    hidden0: torch.Tensor | None = None, keep: dict | None = None) -> torch.Tensor:
    """Metric [N] of N copies of the base prompt; copy i has receiver receivers[i] = (kind, layer, head)
    (kind in q, k, v, m, logits) reading its input plus shifts[i] [T, D]."""
    n = len(receivers)
    kind_name = ref.config.model_type
    layers = _layers(ref)
    handles = []
    layer_in: dict[int, torch.Tensor] = {}

    def layer_pre(l: int):
        def hook(module, args, kwargs):
            x = args[0]
            if l == 0 and hidden0 is not None:
                x = hidden0.expand(n, -1, -1)
            layer_in[l] = x
            return (x,) + tuple(args[1:]), kwargs
        return hook

    def layer_post(l: int):
        def hook(module, args, out):
            x = layer_in[l]
            y = out[0] if isinstance(out, tuple) else out
            y = x + (y - x).detach()
            return (y,) + tuple(out[1:]) if isinstance(out, tuple) else y
        return hook

    busy = []  # the hook calls the projection itself; that inner call must pass through

    def qkv_hook(l: int, kinds: str):
        def hook(module, args, out):
            mine = [(i, r) for i, r in enumerate(receivers) if r[1] == l and r[0] in kinds]
            if not mine or busy:
                return out
            rows = [i for i, _ in mine]
            norm = NORMS[kind_name][0]
            shifted = layer_in[l][rows] + shifts[rows]
            normed = getattr(layers[l], norm)(shifted) if norm else shifted
            busy.append(1)
            try:
                new = _qkv_slices(ref, layers[l], normed)
            finally:
                busy.pop()
            for kind in kinds:
                sel = [(j, i, r) for j, (i, r) in enumerate(mine) if r[0] == kind]
                if sel:
                    values = {kind: torch.stack([new[kind][j, :, r[2]] for j, _, r in sel])}
                    out = _patch_projection(ref, layers[l], kind, out, [i for _, i, _ in sel], [r[2] for _, _, r in sel], values)
            return out
        return hook

    def mlp_pre(l: int):
        def hook(module, args):
            mask = torch.tensor([r[0] == "m" and r[1] == l for r in receivers], dtype=shifts.dtype)
            return (args[0] + shifts * mask[:, None, None],) + tuple(args[1:])
        return hook

    def final_pre(module, args):
        mask = torch.tensor([r[0] == "logits" for r in receivers], dtype=shifts.dtype)
        return (args[0] + shifts * mask[:, None, None],) + tuple(args[1:])

    try:
        for l, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(layer_pre(l), with_kwargs=True))
            if drop_layer == l:
                handles.append(layer.register_forward_hook(layer_post(l)))
            if kind_name == "gpt2":
                handles.append(layer.attn.c_attn.register_forward_hook(qkv_hook(l, "qkv")))
            elif kind_name == "gpt_neox":
                handles.append(layer.attention.query_key_value.register_forward_hook(qkv_hook(l, "qkv")))
            elif kind_name == "phi3":
                handles.append(layer.self_attn.qkv_proj.register_forward_hook(qkv_hook(l, "qkv")))
            elif kind_name == "olmo2":  # the vectors after the whole-projection norm
                for c, module in zip("qkv", ("q_norm", "k_norm", "v_proj")):
                    handles.append(getattr(layer.self_attn, module).register_forward_hook(qkv_hook(l, c)))
            else:
                for c in "qkv":
                    handles.append(getattr(layer.self_attn, f"{c}_proj").register_forward_hook(qkv_hook(l, c)))
            handles.append(getattr(layer, NORMS[kind_name][1]).register_forward_pre_hook(mlp_pre(l)))
        handles.append(_final_norm(ref).register_forward_pre_hook(final_pre))
        output = ref(tokens[None].expand(n, -1), output_attentions=keep is not None)
        logits = output.logits[:, -1]
        if keep is not None:
            keep["attentions"] = output.attentions  # per layer [N, H, T, T]
    finally:
        for handle in handles:
            handle.remove()
    return metric_of(logits, answer.expand(n), distractor.expand(n), metric)


def sender_outputs(ref: Any, tokens: torch.Tensor) -> torch.Tensor:
    """[S, T, D] outputs of input, a{l}.h{h} (W_O^h z_h, no bias), m{l} on one prompt (MIB sender order)."""
    cfg = ref.config
    h = cfg.num_attention_heads
    e = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
    kind = cfg.model_type
    layers = _layers(ref)
    z, mlp, embed = {}, {}, {}
    handles = [layers[0].register_forward_pre_hook(lambda m, a: embed.__setitem__(0, a[0]))]
    out_path = {"gpt2": "attn.c_proj", "gpt_neox": "attention.dense"}.get(kind, "self_attn.o_proj")
    post = POST_NORMS.get(kind)
    share = {}
    for l, layer in enumerate(layers):
        handles.append(_module(layer, out_path).register_forward_pre_hook(lambda m, a, l=l: z.__setitem__(l, a[0])))
        mlp_write = getattr(layer, post[1]) if post else layer.mlp
        handles.append(mlp_write.register_forward_hook(lambda m, a, o, l=l: mlp.__setitem__(l, o)))
        if post:  # a head's output: its share W_O^h z_h * norm(a) / a of the normalised attention write
            handles.append(getattr(layer, post[0]).register_forward_hook(lambda m, a, o, l=l: share.__setitem__(l, o / a[0])))
    try:
        with torch.no_grad():
            ref(tokens[None])
    finally:
        for handle in handles:
            handle.remove()
    rows = [embed[0][0]]
    for l, layer in enumerate(layers):
        proj = _module(layer, out_path)
        w = proj.weight if kind == "gpt2" else proj.weight.T  # [H*E, D]
        for head in range(h):
            row = z[l][0, :, head * e:(head + 1) * e] @ w[head * e:(head + 1) * e]
            rows.append(row * share[l][0] if post else row)
        rows.append(mlp[l][0])
    return torch.stack(rows)


def receiver_spec(name: str) -> tuple[str, int, int]:
    """MIB receiver name -> (kind, layer, head): a1.h2<k> -> (k, 1, 2); m0 -> (m, 0, 0); logits."""
    if name == "logits":
        return ("logits", 10**6, 0)
    if name.startswith("m"):
        return ("m", int(name[1:]), 0)
    layer, rest = name[1:].split(".h")
    head, kind = rest[:-1].split("<")
    return (kind, int(layer), int(head))


def at_position(delta: torch.Tensor, position: int | None) -> torch.Tensor:
    """delta [S, T, D] with every position but ``position`` zeroed (None: unchanged)."""
    if position is None:
        return delta
    keep = torch.zeros(delta.shape[1], dtype=delta.dtype)
    keep[position] = 1.0
    return delta * keep[None, :, None]


def edge_references(hf_model: Any, pairs: Any, edge_names: list[str], sender_names: list[str],
                    direction: str = "noising", drop_layer: int | None = None, ig_steps: int | None = None,
                    position: int | None = None) -> dict[str, torch.Tensor]:
    """{"exact", "eap"} [P, N] (``drop_layer``: the EAP with that layer dropped; ``ig_steps``: EAP-IG)."""
    ref = ungrouped_copy(hf_model)
    base_all, source_all = (pairs.clean, pairs.noise) if direction == "noising" else (pairs.noise, pairs.clean)
    exact, eap = [], []
    for p in range(pairs.n_pairs):
        base, source = base_all[p], source_all[p]
        delta = at_position(sender_outputs(ref, source) - sender_outputs(ref, base), position)  # [S, T, D]
        answer, distractor = pairs.answer[p:p + 1], pairs.distractor[p:p + 1]
        senders = [sender_names.index(e.split("->")[0]) for e in edge_names]
        receivers = [receiver_spec(e.split("->")[1]) for e in edge_names]
        shifts = delta[senders]  # [N, T, D]
        with torch.no_grad():
            zero = receiver_metric(ref, base, answer, distractor, pairs.metric, receivers, torch.zeros_like(shifts))
            full = receiver_metric(ref, base, answer, distractor, pairs.metric, receivers, shifts)
        exact.append(full - zero)
        points = [None] if ig_steps is None else _ig_points(ref, base, source, ig_steps)
        total = torch.zeros(len(edge_names), dtype=shifts.dtype)
        for hidden0 in points:
            eps = torch.zeros(len(edge_names), dtype=shifts.dtype, requires_grad=True)
            value = receiver_metric(ref, base, answer, distractor, pairs.metric, receivers, eps[:, None, None] * shifts,
                                    drop_layer=drop_layer, hidden0=hidden0)
            (grad,) = torch.autograd.grad(value.sum(), eps)
            total = total + grad
        eap.append(total / len(points))
    return {"exact": torch.stack(exact), "eap": torch.stack(eap)}


def _ig_points(ref: Any, base: torch.Tensor, source: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """EAP-IG's inputs: e(source) + (k / m)(e(base) - e(source)), k = 0 .. m-1, as residual streams entering layer 0."""
    captured = {}
    layer0 = _layers(ref)[0]
    handle = layer0.register_forward_pre_hook(lambda m, a: captured.__setitem__(len(captured), a[0]))
    try:
        with torch.no_grad():
            ref(base[None])
            ref(source[None])
    finally:
        handle.remove()
    e_base, e_source = captured[0], captured[1]
    return [e_source + (k / steps) * (e_base - e_source) for k in range(steps)]


def qk_fix_references(hf_model: Any, model: Any, pairs: Any, edge_names: list[str], sender_names: list[str],
                      drop_layer: int | None = None, position: int | None = None) -> dict[int, torch.Tensor]:
    """QK-fix value [P] of every edge into a query or key receiver: Σ (A' - A) · ∂L/∂A over the head's pattern.

    A' comes from transformers' eager attention formula with the softmax in float64 (``reference64``: the
    model's own masks, window and soft-cap; an ungrouped copy, ``output_attentions``) with the receiver's
    projection recomputed from norm(x + Δ_s); A and ∂L/∂A (with ``drop_layer`` detached) from atpstar's
    runner, whose patterns are checked against the model elsewhere.
    """
    from atpstar.runner import Run

    from .brute import dropped_layer

    ref = ungrouped_copy(hf_model, "reference64")  # eager formula, softmax in float64, returns the pattern
    base_all, source_all = pairs.clean, pairs.noise
    chosen = [i for i, e in enumerate(edge_names) if e.endswith("<q>") or e.endswith("<k>")]
    receivers = [receiver_spec(edge_names[i].split("->")[1]) for i in chosen]
    senders = [sender_names.index(edge_names[i].split("->")[0]) for i in chosen]
    out = {i: torch.zeros(pairs.n_pairs, dtype=torch.float64) for i in chosen}
    for p in range(pairs.n_pairs):
        base, source = base_all[p], source_all[p]
        delta = at_position(sender_outputs(ref, source) - sender_outputs(ref, base), position)
        keep: dict = {}
        with torch.no_grad():
            receiver_metric(ref, base, pairs.answer[p:p + 1], pairs.distractor[p:p + 1], pairs.metric, receivers,
                            delta[senders], keep=keep)
        with torch.enable_grad(), dropped_layer(model, drop_layer):
            hidden = model.embed(base[None]).detach().requires_grad_(True)
            run = Run(model.n_layers, record=("pattern",))
            final = model.run_layers(hidden, run)
            metric = metric_of(model.unembed(final[:, -1]), pairs.answer[p:p + 1], pairs.distractor[p:p + 1], pairs.metric)
            grads = torch.autograd.grad(metric.sum(), run.records["pattern"], allow_unused=True)
        for j, i in enumerate(chosen):
            kind, layer, head = receivers[j]
            grad = grads[layer]
            if grad is None:
                continue
            new = keep["attentions"][layer][j, head]  # [T, T]
            old = run.records["pattern"][layer][0, head].detach()
            out[i][p] = ((new - old) * grad[0, head]).sum()
    return out
