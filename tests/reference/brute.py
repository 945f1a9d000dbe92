"""Slow brute-force oracles for the QK fix and GradDrop (loops, one softmax per changed row).

They use atpstar's layer-by-layer ``Run`` only to read base/source q, k, patterns and gradients
(the runner itself is checked against plain hooks in ``hooks``); all the math is redone naively:

- query fix: for one query, recompute its softmax row with the source query, Σ (A' - A) G;
- key fix: for one key, recompute every row that sees it with the source key, Σ (A' - A) G,
  summed over the query heads of its kv group;
- GradDrop: L separate backward passes, each with one layer's residual write detached
  (a forward hook, ``dropped_layer``), Σ_l |Î_l| / (L - 1).

Shape letters: P pairs, L layers, H heads, K kv heads, T positions, E d_head, M d_mlp.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from atpstar.runner import Run

from .hooks import metric_of

SITE = {"neuron": "neuron", "query": "q", "key": "k", "value": "v", "head": "z"}
SITES = ("q", "k", "v", "z", "neuron", "pattern")


def _row_softmax(keys: torch.Tensor, query: torch.Tensor, t: int, scaling: float, cap, window) -> tuple[torch.Tensor, int]:
    """Softmax of row t over its visible keys (t - window, t], scores soft-capped; returns (probs, first key)."""
    first = 0 if window is None else max(0, t - window + 1)
    scores = keys[first: t + 1] @ query * scaling
    if cap is not None:
        scores = cap * torch.tanh(scores / cap)
    return torch.softmax(scores, -1), first


def query_fix(q_source: torch.Tensor, k_base: torch.Tensor, pattern: torch.Tensor, grad: torch.Tensor,
              scaling: float, cap=None, window=None) -> torch.Tensor:
    """q_source [H, T, E], k_base [K, T, E], pattern/grad [H, T, T] -> [H, T]."""
    n_heads, n_pos = q_source.shape[:2]
    group = n_heads // k_base.shape[0]
    out = torch.zeros(n_heads, n_pos, dtype=q_source.dtype)
    for h in range(n_heads):
        for t in range(n_pos):
            new, first = _row_softmax(k_base[h // group], q_source[h, t], t, scaling, cap, window)
            out[h, t] = ((new - pattern[h, t, first: t + 1]) * grad[h, t, first: t + 1]).sum()
    return out


def key_fix(q_base: torch.Tensor, k_base: torch.Tensor, k_source: torch.Tensor, grad: torch.Tensor,
            scaling: float, cap=None, window=None) -> torch.Tensor:
    """q_base [H, T, E], k_base/k_source [K, T, E], grad [H, T, T] -> [K, T] (summed over the group's heads)."""
    n_heads, n_pos = q_base.shape[:2]
    n_kv = k_base.shape[0]
    group = n_heads // n_kv
    out = torch.zeros(n_kv, n_pos, dtype=q_base.dtype)
    for g in range(n_kv):
        for s in range(n_pos):
            keys = k_base[g].clone()
            keys[s] = k_source[g, s]
            for h in range(g * group, (g + 1) * group):
                for t in range(s, n_pos):
                    old, first = _row_softmax(k_base[g], q_base[h, t], t, scaling, cap, window)
                    new, _ = _row_softmax(keys, q_base[h, t], t, scaling, cap, window)
                    out[g, s] += ((new - old) * grad[h, t, first: t + 1]).sum()
    return out


@contextmanager
def dropped_layer(model: Any, layer: int | None) -> Iterator[None]:
    """Hold ``layer``'s residual write constant in the backward graph: out = x + (out - x).detach()."""
    if layer is None:
        yield
        return

    def drop(module: torch.nn.Module, args: tuple, out: Any) -> Any:
        hidden = out[0] if isinstance(out, tuple) else out
        kept = args[0] + (hidden - args[0].to(hidden.device)).detach()
        return (kept, *out[1:]) if isinstance(out, tuple) else kept

    handle = model.layer_modules[layer].register_forward_hook(drop)
    try:
        yield
    finally:
        handle.remove()


def records(model: Any, tokens: torch.Tensor, pairs: Any = None, drop_layer: int | None = None) -> tuple[Run, dict]:
    """A run on ``tokens`` recording all sites; with ``pairs``, also d metric / d site (with one layer dropped)."""
    run = Run(model.n_layers, record=SITES)
    if pairs is None:
        with torch.no_grad():
            model.run_layers(model.embed(tokens), run)
        return run, {}
    with torch.enable_grad(), dropped_layer(model, drop_layer):
        hidden = model.embed(tokens).detach().requires_grad_(True)
        final = model.run_layers(hidden, run)
        metric = metric_of(model.unembed(final[:, -1]), pairs.answer, pairs.distractor, pairs.metric)
        keys = [(site, layer) for site in SITES for layer in range(model.n_layers)]
        grads = torch.autograd.grad(metric.sum(), [run.records[s][l] for s, l in keys], allow_unused=True)
    return run, {key: (torch.zeros_like(run.records[key[0]][key[1]]) if g is None else g) for key, g in zip(keys, grads)}


def atp(model: Any, pairs: Any, node_types, direction: str = "noising", qk_fix: bool = False,
        drop_layer: int | None = None) -> dict[str, torch.Tensor]:
    """Per-pair AtP (optionally with the brute-force QK fix, optionally with a dropped layer): [P, *layout]."""
    base_tokens, source_tokens = (pairs.clean, pairs.noise) if direction == "noising" else (pairs.noise, pairs.clean)
    source, _ = records(model, source_tokens)
    base, grads = records(model, base_tokens, pairs, drop_layer)
    out: dict[str, torch.Tensor] = {}
    for t in node_types:
        per_layer = []
        for layer in range(model.n_layers):
            args = model.attention_args[layer]
            scaling, cap, window = args.scaling, args.softcap, args.window
            src = source.records[SITE[t]][layer]
            ref = base.records[SITE[t]][layer].detach()
            if qk_fix and t == "query":
                est = torch.stack([
                    query_fix(src[p], base.records["k"][layer][p].detach(), base.records["pattern"][layer][p].detach(),
                              grads[("pattern", layer)][p], scaling, cap, window) for p in range(pairs.n_pairs)])
            elif qk_fix and t == "key":
                est = torch.stack([
                    key_fix(base.records["q"][layer][p].detach(), ref[p], src[p], grads[("pattern", layer)][p], scaling,
                            cap, window)
                    for p in range(pairs.n_pairs)])
            else:
                prod = (src - ref) * grads[(SITE[t], layer)]
                est = prod if t == "neuron" else prod.sum(-1)  # [P, T, M] or [P, U, T]
            per_layer.append(est)
        out[t] = torch.stack(per_layer, 1)
    return out


def graddrop(model: Any, pairs: Any, node_types, direction: str = "noising", qk_fix: bool = False) -> dict[str, torch.Tensor]:
    """Σ_l |Î_l| / (L - 1) with L separate dropped backward passes."""
    terms = [atp(model, pairs, node_types, direction, qk_fix, drop_layer=l) for l in range(model.n_layers)]
    return {t: sum(term[t].abs() for term in terms) / (model.n_layers - 1) for t in node_types}
