"""Brute-force integrated gradients on nodes from plain module hooks on the ``transformers`` model.

Î_IG(n) = (n(x_source) - n(x_base)) · (1/m) Σ_{k=0}^{m-1} ∂L/∂n at the run whose residual stream entering
layer 0 is e(x_source) + (k/m)(e(x_base) - e(x_source)) (EAP-IG's left Riemann schedule). The
interpolated input replaces layer 0's input through a forward pre-hook; node tensors come from the hook
sites of ``reference.hooks`` (``Capture``); gradients by torch.autograd.grad on the hooked tensors of
each interpolated run, in the model's dtype (float64 in the tests). Nothing of atpstar is used.
"""

from __future__ import annotations

from typing import Any

import torch

from .hooks import NODE_TYPES, Capture, _layers, _layout, _tokens, metric_of


def _layer0_inputs(ref_model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """[P, T, D] residual stream entering layer 0 (embeddings, positions and scaling included)."""
    seen = []
    handle = _layers(ref_model)[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            ref_model(tokens)
    finally:
        handle.remove()
    return seen[0]


def integrated_gradients(ref_model: Any, pairs: Any, steps: int, direction: str = "noising",
                         node_types=NODE_TYPES) -> dict[str, torch.Tensor]:
    """{node type: [P, *layout]} of Î_IG with ``steps`` interpolated inputs."""
    base_tokens, source_tokens = _tokens(pairs, direction)
    n_layers = len(_layers(ref_model))
    e_base, e_source = _layer0_inputs(ref_model, base_tokens), _layer0_inputs(ref_model, source_tokens)
    with torch.no_grad(), Capture(ref_model, tuple(node_types)) as source:
        ref_model(source_tokens)
    with torch.no_grad(), Capture(ref_model, tuple(node_types)) as base:
        ref_model(base_tokens)
    total: dict[tuple[str, int], torch.Tensor] = {}
    for k in range(steps):
        point = e_source + (k / steps) * (e_base - e_source)  # [P, T, D]
        handle = _layers(ref_model)[0].register_forward_pre_hook(lambda module, args, x=point: (x,) + tuple(args[1:]))
        try:
            with torch.enable_grad(), Capture(ref_model, tuple(node_types)) as run:
                logits = ref_model(base_tokens).logits[:, -1]
                metric = metric_of(logits, pairs.answer, pairs.distractor, pairs.metric)
                keys = [(t, layer) for t in node_types for layer in range(n_layers)]
                grads = torch.autograd.grad(metric.sum(), [run.raw[t][layer] for t, layer in keys], allow_unused=True)
        finally:
            handle.remove()
        for (t, layer), grad in zip(keys, grads):
            grad = torch.zeros_like(run.raw[t][layer]) if grad is None else grad
            total[(t, layer)] = total[(t, layer)] + grad if k else grad
    result = {}
    for t in node_types:
        per_layer = []
        for layer in range(n_layers):
            diff = source.view(t, layer) - base.view(t, layer)  # [P, T, U, X]
            per_layer.append((diff * base.view(t, layer, total[(t, layer)] / steps)).sum(-1))  # [P, T, U]
        result[t] = _layout(t, per_layer)
    return result
