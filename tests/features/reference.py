"""Brute-force latent edges from plain module hooks on a copy of the ``transformers`` model (no atpstar runner).

Sites: ``hook_resid_post`` L is layer L's output; ``hook_attn_out`` / ``hook_mlp_out`` L the output of its
attention / MLP module (pre-norm families only). A dictionary gives ``hook``, ``encode``, ``W_dec`` and
``decoder_scale`` (one unit of latent i adds decoder_scale(x_t) W_dec[i] at t, x the base activation).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from reference.hooks import _layers, metric_of, reference_copy

_MODULE = {"hook_attn_out": {"gpt2": "attn", "gpt_neox": "attention"}, "hook_mlp_out": {}}


def _module(hf_model: Any, hook: str) -> torch.nn.Module:
    _, layer, suffix = hook.split(".", 2)
    block = _layers(hf_model)[int(layer)]
    if suffix == "hook_resid_post":
        return block
    if suffix == "hook_attn_out":
        return getattr(block, _MODULE[suffix].get(hf_model.config.model_type, "self_attn"))
    return block.mlp


class _Stop(Exception):
    pass


@contextmanager
def hooked(hf_model: Any, edits: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """Replace the output of each hooked module by ``edit(output)`` (the first element of a tuple)."""
    handles = []

    def hook(edit: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        def run(module: Any, args: Any, out: Any) -> Any:
            if isinstance(out, tuple):
                return (edit(out[0]),) + tuple(out[1:])
            return edit(out)

        return run

    try:
        for name, edit in edits.items():
            handles.append(_module(hf_model, name).register_forward_hook(hook(edit)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _metric(ref: Any, pairs: Any, tokens: torch.Tensor, edits: dict) -> torch.Tensor:
    with hooked(ref, edits):
        logits = ref(tokens).logits[:, -1]
    return metric_of(logits, pairs.answer, pairs.distractor, pairs.metric)


def _site_values(ref: Any, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable:
        def edit(x: torch.Tensor) -> torch.Tensor:
            seen[name] = x
            return x

        return edit

    with torch.no_grad(), hooked(ref, {h: keep(h) for h in hooks}):
        ref(tokens)
    return seen


def _add(pos: int, vector: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def edit(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, pos] += vector
        return x

    return edit


def latent_edges(hf_model: Any, pairs: Any, up: Any, down: Any | None, upstream, downstream=()) -> tuple:
    """(exact [U, N, P], linear [U, N, P]) edges up -> down, or up -> metric ([U, P] each) when ``down`` is None.

    The exact effect patches one pair at a time, one edge at a time (base = clean, source = noise); the
    linear one differentiates f_d with respect to a scalar step along W_dec[u] by autograd.
    """
    ref = reference_copy(hf_model)
    hooks = [up.hook] + ([down.hook] if down is not None else [])
    exact, linear = [], []
    for p in range(pairs.n_pairs):
        clean, noise = pairs.clean[p : p + 1], pairs.noise[p : p + 1]
        sub = pairs.subset([p])
        base_x, source_x = _site_values(ref, clean, hooks), _site_values(ref, noise, hooks)
        base_m = _metric(ref, sub, clean, {})
        rows_e, rows_l = [], []
        for i, t in upstream:
            delta = float(up.encode(source_x[up.hook])[0, t, i] - up.encode(base_x[up.hook])[0, t, i])
            unit_up = up.decoder_scale(base_x[up.hook][0, t]) * up.W_dec[i]
            step = delta * unit_up
            if down is None:
                with torch.no_grad():
                    rows_e.append(float(_metric(ref, sub, clean, {up.hook: _add(t, step)}) - base_m))
                eps = torch.zeros((), dtype=torch.float64, requires_grad=True)
                m = _metric(ref, sub, clean, {up.hook: _add(t, eps * unit_up)})
                rows_l.append(delta * float(torch.autograd.grad(m.sum(), eps)[0]))
                continue
            cols_e, cols_l = [], []
            for j, t2 in downstream:
                f_base = down.encode(base_x[down.hook])[0, t2, j]
                found = {}

                def read(x: torch.Tensor) -> torch.Tensor:
                    found["f"] = down.encode(x)[0, t2, j]
                    raise _Stop

                try:
                    with torch.no_grad():
                        _metric(ref, sub, clean, {up.hook: _add(t, step), down.hook: read})
                except _Stop:
                    pass
                unit_down = down.decoder_scale(base_x[down.hook][0, t2]) * down.W_dec[j]
                shift = (found["f"] - f_base) * unit_down
                with torch.no_grad():
                    cols_e.append(float(_metric(ref, sub, clean, {down.hook: _add(t2, shift)}) - base_m))
                # Linear: Δf_u · ∂f_d/∂ε · ∂m/∂f_d, each by autograd at the base run.
                eps = torch.zeros((), dtype=torch.float64, requires_grad=True)
                try:
                    _metric(ref, sub, clean, {up.hook: _add(t, eps * unit_up), down.hook: read})
                except _Stop:
                    pass
                dfd = torch.autograd.grad(found["f"], eps)[0]
                lam = torch.zeros((), dtype=torch.float64, requires_grad=True)
                m = _metric(ref, sub, clean, {down.hook: _add(t2, lam * unit_down)})
                dm = torch.autograd.grad(m.sum(), lam)[0]
                cols_l.append(delta * float(dfd) * float(dm))
            rows_e.append(cols_e)
            rows_l.append(cols_l)
        exact.append(rows_e)
        linear.append(rows_l)
    exact_t = torch.tensor(exact, dtype=torch.float64)  # [P, U(, N)]
    linear_t = torch.tensor(linear, dtype=torch.float64)
    order = (1, 0) if down is None else (1, 2, 0)
    return exact_t.permute(*order), linear_t.permute(*order)
