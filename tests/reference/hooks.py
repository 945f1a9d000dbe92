"""Brute-force references built only from plain PyTorch module hooks on the ``transformers`` model.

Nothing here imports atpstar's model, runner or engine: the model runs its own eager attention
(a private deep copy, ``reference_copy``), one full forward per patched node
(batched: element i of a batch patches node i), and metrics are recomputed from full logits.

Hook sites (shape letters: B batch, T positions, H heads, K kv heads, E d_head, M d_mlp):

- neuron: input of the MLP output projection (pre-hook), [B, T, M];
- query/key/value: output of the q/k/v projections (Llama, pre-rotary; replacing pre- or
  post-rotary at the same position is the same intervention, and AtP's product is the same since
  rotary is orthogonal per position), slices of GPT-2's ``attn.c_attn`` output (q|k|v of the hidden
  size each), GPT-NeoX's ``attention.query_key_value`` output viewed as [B, T, H, 3E] with q, k, v
  chunks per head, Phi-3's ``qkv_proj`` output ([q heads | k heads | v heads]); with QK-norm the
  output of ``q_norm``/``k_norm`` (Qwen3: [B, T, H, E]; Gemma-3: [B, H, T, E]; OLMo-2: the whole
  projection [B, T, H·E]), since atpstar's query/key nodes are the vectors attention receives;
- head: input of the attention output projection (pre-hook), head h's slice.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

NODE_TYPES = ("neuron", "query", "key", "value", "head")


def _d_head(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _n_kv(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _layers(hf_model: Any) -> Any:
    for path in ("transformer.h", "gpt_neox.layers", "model.layers"):
        obj = hf_model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise ValueError("unknown family")


def _site(hf_model: Any, node_type: str) -> tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]:
    """(module path inside a layer, "pre"|"fwd", view of the hooked tensor as [B, T, U, X])."""
    cfg = hf_model.config
    kind = cfg.model_type
    n_heads = cfg.num_attention_heads
    d_head = _d_head(cfg)
    n_kv = _n_kv(cfg)
    qkv_index = {"query": 0, "key": 1, "value": 2}
    if node_type == "neuron":
        path = {"gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h"}.get(kind, "mlp.down_proj")
        return path, "pre", lambda x: x.unsqueeze(-1)
    if node_type == "head":
        path = {"gpt2": "attn.c_proj", "gpt_neox": "attention.dense"}.get(kind, "self_attn.o_proj")
        return path, "pre", lambda x: x.view(*x.shape[:2], n_heads, d_head)
    i = qkv_index[node_type]
    if kind == "gpt2":
        return "attn.c_attn", "fwd", lambda x: x.view(*x.shape[:2], 3, n_heads, d_head)[:, :, i]
    if kind == "gpt_neox":
        return "attention.query_key_value", "fwd", lambda x: x.view(*x.shape[:2], n_heads, 3, d_head)[:, :, :, i]
    units = n_heads if node_type == "query" else n_kv
    if kind == "phi3":
        start = (0, n_heads, n_heads + n_kv)[i] * d_head
        return "self_attn.qkv_proj", "fwd", lambda x: x[..., start:start + units * d_head].view(*x.shape[:2], units, d_head)
    if node_type != "value" and kind in ("qwen3", "gemma3_text", "olmo2"):
        norm = "self_attn.q_norm" if node_type == "query" else "self_attn.k_norm"
        if kind == "gemma3_text":  # normed after the transpose to [B, H, T, E]
            return norm, "fwd", lambda x: x.transpose(1, 2)
        return norm, "fwd", lambda x: x.view(*x.shape[:2], units, d_head)
    proj = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}[node_type]
    return f"self_attn.{proj}", "fwd", lambda x: x.view(*x.shape[:2], units, d_head)


def _module(layer: Any, path: str) -> Any:
    for part in path.split("."):
        layer = getattr(layer, part)
    return layer


def reference64_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor, scaling: float, dropout: float = 0.0,
                          softcap: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention formula with the softmax in the input precision (float64 stays float64).

    The mask is the boolean one transformers builds for the layer (causal, and the sliding-window
    overlay on sliding layers), never skipped (``_reference_mask``); the soft-cap is the one the
    model passes.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    weights = query @ key.transpose(2, 3) * scaling
    if softcap is not None:
        weights = torch.tanh(weights / softcap) * softcap
    weights = weights.masked_fill(~attention_mask, float("-inf"))
    probs = torch.softmax(weights, -1)
    return (probs @ value).transpose(1, 2).contiguous(), probs


def _reference_mask(*args: Any, **kwargs: Any) -> Any:
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False  # always a boolean [B, 1, T, T] mask, also for plain causal layers
    return sdpa_mask(*args, **kwargs)


def _register_reference64() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register("reference64", reference64_attention)
    AttentionMaskInterface.register("reference64", _reference_mask)


def reference_copy(hf_model: Any, attn_implementation: str | None = None) -> Any:
    """A private deep copy of the model running transformers' own attention.

    Default for GPT-2, GPT-NeoX and Llama: ``"sdpa"``, not ``"eager"``: the eager attention functions
    of GPT-NeoX and Llama in transformers take the softmax in float32 even for float64 models
    (``softmax(..., dtype=float32)``), which caps agreement at ~1e-7; torch's SDPA on CPU stays in
    float64. GPT-2's eager is float64. Other families get ``"reference64"`` (eager in float64 with
    the model's own masks and soft-cap; SDPA would drop Gemma-2's soft-cap).
    """
    if attn_implementation is None:
        attn_implementation = "sdpa" if hf_model.config.model_type in ("gpt2", "gpt_neox", "llama") else "reference64"
    if attn_implementation == "reference64":
        _register_reference64()
    ref = copy.deepcopy(hf_model)
    for module in ref.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = attn_implementation
    return ref.eval()


def metric_of(logits: torch.Tensor, answer: torch.Tensor, distractor: torch.Tensor | None, metric: Any) -> torch.Tensor:
    """Metric from last-position logits [B, V] -> [B], written out independently of atpstar.pairs."""
    if metric == "logit_diff":
        return logits[torch.arange(len(answer)), answer] - logits[torch.arange(len(answer)), distractor]
    if metric == "logprob":
        return torch.log_softmax(logits, -1)[torch.arange(len(answer)), answer]
    return metric(logits, answer, distractor)


class Capture:
    """Record (or patch) the hooked tensors of chosen node types in every layer during one forward."""

    def __init__(self, hf_model: Any, node_types: tuple[str, ...], patch: Callable | None = None) -> None:
        self.hf_model = hf_model
        self.node_types = node_types
        self.patch = patch  # (node_type, layer, tensor) -> tensor
        self.raw: dict[str, list[torch.Tensor]] = {t: [] for t in node_types}
        self.handles: list[Any] = []

    def __enter__(self) -> Capture:
        for layer_i, layer in enumerate(_layers(self.hf_model)):
            for t in self.node_types:
                path, kind, _ = _site(self.hf_model, t)
                module = _module(layer, path)
                if kind == "pre":
                    self.handles.append(module.register_forward_pre_hook(self._pre(t, layer_i)))
                else:
                    self.handles.append(module.register_forward_hook(self._fwd(t, layer_i)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()

    def _apply(self, t: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        if self.patch is not None:
            x = self.patch(t, layer, x)
        self.raw[t].append(x)
        return x

    def _pre(self, t: str, layer: int) -> Callable:
        return lambda module, args: (self._apply(t, layer, args[0]),) + tuple(args[1:])

    def _fwd(self, t: str, layer: int) -> Callable:
        return lambda module, args, out: self._apply(t, layer, out)

    def view(self, t: str, layer: int, x: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, U, X] view of the recorded tensor (or of ``x``, e.g. its gradient)."""
        return _site(self.hf_model, t)[2](self.raw[t][layer] if x is None else x)


def _layout(t: str, per_layer: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-layer [P, T, U] into the atpstar layout: neuron [P, L, T, M], others [P, L, U, T]."""
    stacked = torch.stack(per_layer, 1)  # [P, L, T, U]
    return stacked if t == "neuron" else stacked.transpose(2, 3)


def _tokens(pairs: Any, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
    return (pairs.clean, pairs.noise) if direction == "noising" else (pairs.noise, pairs.clean)


def exact_patching(ref_model: Any, pairs: Any, direction: str = "noising", node_types=NODE_TYPES,
                   chunk: int = 512) -> dict[str, torch.Tensor]:
    """I(n) = L(base | do(n <- n(source))) - L(base) for every node, one (batched) full forward per node."""
    base_tokens, source_tokens = _tokens(pairs, direction)
    n_layers = len(_layers(ref_model))
    out: dict[str, list[list[torch.Tensor]]] = {t: [] for t in node_types}
    with torch.no_grad():
        with Capture(ref_model, tuple(node_types)) as source:
            ref_model(source_tokens)
        base_logits = ref_model(base_tokens).logits[:, -1]
        for p in range(pairs.n_pairs):
            answer, distractor = pairs.answer[p:p + 1], None if pairs.distractor is None else pairs.distractor[p:p + 1]
            base_metric = metric_of(base_logits[p:p + 1], answer, distractor, pairs.metric)
            for t in node_types:
                per_layer = []
                for layer in range(n_layers):
                    src = source.view(t, layer)[p]  # [T, U, X]
                    n_pos, n_units = src.shape[:2]
                    pos, unit = torch.meshgrid(torch.arange(n_pos), torch.arange(n_units), indexing="ij")
                    pos, unit = pos.flatten(), unit.flatten()
                    effects = []
                    for s in range(0, len(pos), chunk):
                        pos_c, unit_c = pos[s:s + chunk], unit[s:s + chunk]
                        effects.append(_patched(ref_model, base_tokens[p], t, layer, pos_c, unit_c,
                                                src[pos_c, unit_c], answer, distractor, pairs.metric) - base_metric)
                    per_layer.append(torch.cat(effects).view(n_pos, n_units))
                out[t].append(per_layer)
    return {t: _layout(t, [torch.stack([out[t][p][l] for p in range(pairs.n_pairs)]) for l in range(n_layers)])
            for t in node_types}


def _patched(ref_model: Any, tokens: torch.Tensor, t: str, layer: int, pos: torch.Tensor, unit: torch.Tensor,
             values: torch.Tensor, answer: torch.Tensor, distractor: torch.Tensor | None, metric: Any) -> torch.Tensor:
    """Metric [N] of N copies of ``tokens`` where copy i has node (layer, pos[i], unit[i]) set to values[i]."""
    n = len(pos)
    viewer = _site(ref_model, t)[2]

    def patch(at_t: str, at_layer: int, x: torch.Tensor) -> torch.Tensor:
        if at_t != t or at_layer != layer:
            return x
        x = x.clone()
        viewer(x)[torch.arange(n), pos, unit] = values
        return x

    with Capture(ref_model, (t,), patch=patch):
        logits = ref_model(tokens[None].expand(n, -1)).logits[:, -1]
    return metric_of(logits, answer.expand(n), None if distractor is None else distractor.expand(n), metric)


def atp(ref_model: Any, pairs: Any, direction: str = "noising", node_types=NODE_TYPES) -> dict[str, torch.Tensor]:
    """Î(n) = (n(source) - n(base)) · ∂L/∂n at the base run, gradients by torch.autograd.grad on hooked tensors."""
    base_tokens, source_tokens = _tokens(pairs, direction)
    n_layers = len(_layers(ref_model))
    with torch.no_grad(), Capture(ref_model, tuple(node_types)) as source:
        ref_model(source_tokens)
    with torch.enable_grad(), Capture(ref_model, tuple(node_types)) as base:
        logits = ref_model(base_tokens).logits[:, -1]
        metric = metric_of(logits, pairs.answer, pairs.distractor, pairs.metric)
        tensors = [base.raw[t][layer] for t in node_types for layer in range(n_layers)]
        grads = torch.autograd.grad(metric.sum(), tensors, allow_unused=True)
    result = {}
    for i, t in enumerate(node_types):
        per_layer = []
        for layer in range(n_layers):
            grad = grads[i * n_layers + layer]
            grad = torch.zeros_like(tensors[i * n_layers + layer]) if grad is None else grad
            diff = source.view(t, layer) - base.view(t, layer).detach()  # [P, T, U, X]
            per_layer.append((diff * base.view(t, layer, grad)).sum(-1))  # [P, T, U]
        result[t] = _layout(t, per_layer)
    return result
