"""Brute-force references for dictionary latents, written from the formulas (not from atpstar.dictionaries).

A ``Spec`` holds a dictionary's raw weights (SAELens orientation) and settings, read from the files the
fixtures wrote. References run full forwards from the embeddings with a ``Run`` patch:

- exact: latent i at position t set to its source value = the write site gains Δf_i · scale · W_dec[i] at t
  (error node: Δerror_t), one full forward per (dictionary, latent, position), all pairs at once;
- linearisation: the write site replaced by write(f) + error with f and error autograd leaves at their
  base values (the dictionary spliced in, SFC's error term); AtP = Δf · ∂L/∂f, Δerror · ∂L/∂error;
  with ``drop_layer``, that layer's residual write held constant in the backward (GradDrop, §5).

Shape letters: P pairs, S d_sae, T positions, D d_model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import atpstar
from atpstar.runner import Run
from reference.brute import dropped_layer

SITE = {  # hook suffix -> (run site, layer shift)
    "hook_resid_pre": ("resid_pre", 0), "hook_resid_post": ("resid_pre", 1), "hook_attn_out": ("attn_out", 0),
    "hook_mlp_out": ("mlp_out", 0), "hook_mlp_in": ("mlp_in", 0), "hook_resid_mid": ("resid_mid", 0),
}  # fmt: skip


def site_of(hook: str) -> tuple[str, int]:
    _, layer, suffix = hook.split(".", 2)
    site, shift = SITE[suffix]
    return site, int(layer) + shift


@dataclass
class Spec:
    name: str
    read: str  # hook
    write: str  # hook
    weights: dict  # W_enc [D, S], W_dec [S, D], b_enc, b_dec, threshold?, W_skip? [D, D] (x @ W_skip)
    activation: str = "relu"
    k: int = 0
    apply_b_dec: bool = False
    norm: str = "none"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights
        if self.norm == "constant_norm_rescale":
            x = x * (x.shape[-1] ** 0.5) / x.norm(dim=-1, keepdim=True)
        if self.apply_b_dec:
            x = x - w["b_dec"]
        pre = torch.einsum("...d,ds->...s", x, w["W_enc"]) + w["b_enc"]
        if self.activation == "jumprelu":
            return torch.where(pre > w["threshold"], pre, torch.zeros_like(pre))
        if self.activation == "topk":
            keep = torch.zeros_like(pre, dtype=torch.bool).scatter(-1, pre.topk(self.k, dim=-1).indices, True)
            return torch.where(keep, pre.clamp(min=0), torch.zeros_like(pre))
        return pre.clamp(min=0)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "constant_norm_rescale":
            return x.norm(dim=-1, keepdim=True) / x.shape[-1] ** 0.5
        return torch.ones_like(x[..., :1])

    def write_of(self, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        w = self.weights
        out = (torch.einsum("...s,sd->...d", f, w["W_dec"]) + w["b_dec"]) * self.scale(x)
        return out + (x @ w["W_skip"] if "W_skip" in w else 0)


def _metric(model, pairs, tokens, patch=None, hidden=None):
    run = Run(model.n_layers, record=["resid_pre", "attn_out", "mlp_in", "mlp_out", "resid_mid"], patch=patch)
    hidden = model.embed(tokens) if hidden is None else hidden
    logits = model.unembed(model.run_layers(hidden, run)[:, -1])
    return pairs.evaluate_metric(logits, torch.arange(pairs.n_pairs)), run


def _io(spec: Spec, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    (rs, rl), (ws, wl) = site_of(spec.read), site_of(spec.write)
    return run.get(rs, rl), run.get(ws, wl)


def exact(model, pairs, spec: Spec, direction: str = "noising") -> tuple[torch.Tensor, torch.Tensor]:
    """(latents [P, S, T], error [P, T]): one full forward per node, every pair at once."""
    base, source = pairs.base_and_source(direction)
    with torch.no_grad():
        base_metric, base_run = _metric(model, pairs, base)
        _, source_run = _metric(model, pairs, source)
        (xb, yb), (xs, ys) = _io(spec, base_run), _io(spec, source_run)
        fb, fs = spec.encode(xb), spec.encode(xs)
        d_f, d_err = fs - fb, (ys - spec.write_of(fs, xs)) - (yb - spec.write_of(fb, xb))
        ws, wl = site_of(spec.write)
        n_sae, n_pos = fb.shape[-1], fb.shape[1]
        latents = torch.zeros(pairs.n_pairs, n_sae, n_pos, dtype=torch.float64)
        error = torch.zeros(pairs.n_pairs, n_pos, dtype=torch.float64)
        for t in range(n_pos):
            for i in range(-1, n_sae):
                add = d_err[:, t] if i < 0 else d_f[:, t, i : i + 1] * spec.scale(xb[:, t]) * spec.weights["W_dec"][i]

                def patch(layer, site, x, run, t=t, add=add):
                    if layer == wl and site == ws:
                        x = x.clone()
                        x[:, t] += add
                    return x

                effect = (_metric(model, pairs, base, patch)[0] - base_metric).double()
                if i < 0:
                    error[:, t] = effect
                else:
                    latents[:, i, t] = effect
    return latents, error


def linearised(model, pairs, spec: Spec, direction: str = "noising", drop_layer: int | None = None,
               steps: int | None = None):
    """(latents [P, S, T], error [P, T]) AtP of the spliced dictionary, by autograd (one layer dropped); with
    ``steps``, the gradient averaged over the embeddings e_s + (k/m)(e_b - e_s), k < m (integrated gradients)."""
    base, source = pairs.base_and_source(direction)
    with torch.no_grad():
        _, source_run = _metric(model, pairs, source)
        _, base_run = _metric(model, pairs, base)
        xs, ys = _io(spec, source_run)
        xb, yb = _io(spec, base_run)
        fs, fb = spec.encode(xs), spec.encode(xb)
    d_f, d_err = fs - fb, (ys - spec.write_of(fs, xs)) - (yb - spec.write_of(fb, xb))
    if steps is None:
        grad_f, grad_err = _spliced_grads(model, pairs, spec, base, drop_layer)
    else:
        e_b, e_s = model.embed(base), model.embed(source)
        grads = [_spliced_grads(model, pairs, spec, base, None, e_s + (k / steps) * (e_b - e_s)) for k in range(steps)]
        grad_f, grad_err = (sum(g[i] for g in grads) / steps for i in range(2))
    return (d_f * grad_f).transpose(1, 2).double(), (d_err * grad_err).sum(-1).double()


def _spliced_grads(model, pairs, spec, base, drop_layer, hidden=None):
    """(∂L/∂f [P, T, S], ∂L/∂error [P, T, D]) with the dictionary spliced in at its write site."""
    leaves = {}
    ws, wl = site_of(spec.write)
    rs, rl = site_of(spec.read)

    def splice(layer, site, x, run):
        if layer == rl and site == rs:
            leaves["x"] = x.detach()
        if layer == wl and site == ws:
            xb = leaves["x"]
            f = spec.encode(xb).requires_grad_(True)
            err = (x.detach() - spec.write_of(f.detach(), xb)).requires_grad_(True)
            leaves["f"], leaves["err"] = f, err
            return spec.write_of(f, xb) + err
        return x

    with torch.enable_grad(), dropped_layer(model, drop_layer):
        metric, _ = _metric(model, pairs, base, splice, hidden)
        grads = torch.autograd.grad(metric.sum(), [leaves["f"], leaves["err"]], allow_unused=True)
    return [torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(("f", "err"), grads)]


def graddrop(model, pairs, spec: Spec, direction: str = "noising"):
    """Σ_l |Î_l| / (L - 1) over the L layers dropped one at a time."""
    terms = [linearised(model, pairs, spec, direction, layer) for layer in range(model.n_layers)]
    return tuple(sum(term[i].abs() for term in terms) / (model.n_layers - 1) for i in range(2))


def downstream(spec: Spec, n_layers: int) -> int | None:
    """The attention layer reading the write directly (resid_pre: that layer; attn_out/mlp_out: the next)."""
    site, layer = site_of(spec.write)
    m = layer if site == "resid_pre" else layer + 1 if site in ("attn_out", "mlp_out", "resid_mid") else None
    return m if m is not None and m < n_layers else None


def _grads_with_attention(model, pairs, spec, base, m, drop_layer):
    """(∂L/∂f, ∂L/∂error, ∂L/∂q_m, ∂L/∂k_m, ∂L/∂pattern_m, base resid_pre_m, base pattern_m), spliced dictionary."""
    leaves = {}
    ws, wl = site_of(spec.write)
    rs, rl = site_of(spec.read)

    def splice(layer, site, x, run):
        if layer == m and site == "resid_pre":
            leaves["resid_pre"] = x.detach()
        if layer == rl and site == rs:
            leaves["x"] = x.detach()
        if layer == wl and site == ws:
            xb = leaves["x"]
            f = spec.encode(xb).requires_grad_(True)
            err = (x.detach() - spec.write_of(f.detach(), xb)).requires_grad_(True)
            leaves["f"], leaves["err"] = f, err
            return spec.write_of(f, xb) + err
        if layer == m and site in ("q", "k", "pattern"):
            leaves[site] = x
        return x

    with torch.enable_grad(), dropped_layer(model, drop_layer):
        metric, _ = _metric(model, pairs, base, splice)
        keys = ["f", "err", "q", "k", "pattern"]
        grads = torch.autograd.grad(metric.sum(), [leaves[k] for k in keys], allow_unused=True)
    grads = [torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(keys, grads)]
    return (*grads, leaves["resid_pre"].detach(), leaves["pattern"].detach())


def qk_fixed(model, pairs, spec: Spec, direction: str = "noising", drop_layer: int | None = None):
    """(latents [P, S, T], error [P, T]) AtP with the QK fix at the downstream attention layer m:
    Î - δ · (∂L/∂x_m through q_m, k_m only) + Σ (A'(q(x_m + δ_t), k(x_m + δ_t)) - A) · ∂L/∂A."""
    base, source = pairs.base_and_source(direction)
    m = downstream(spec, model.n_layers)
    with torch.no_grad():
        _, source_run = _metric(model, pairs, source)
        _, base_run = _metric(model, pairs, base)
        (xs, ys), (xb, yb) = _io(spec, source_run), _io(spec, base_run)
        fs, fb = spec.encode(xs), spec.encode(xb)
    d_f, d_err = fs - fb, (ys - spec.write_of(fs, xs)) - (yb - spec.write_of(fb, xb))
    grad_f, grad_err, g_q, g_k, g_a, x_m, pattern = _grads_with_attention(model, pairs, spec, base, m, drop_layer)
    latents = (d_f * grad_f).transpose(1, 2).double()
    error = (d_err * grad_err).sum(-1).double()
    with torch.enable_grad():
        x = x_m.clone().requires_grad_(True)
        q, k, _ = model.layer_qkv(m, x)
        (through_qk,) = torch.autograd.grad((q * g_q).sum() + (k * g_k).sum(), x)
    args = model.attention_args[m]
    scale = spec.scale(xb)
    n_pairs, n_pos, n_sae = fb.shape
    with torch.no_grad():
        for p in range(n_pairs):
            for t in range(n_pos):
                for i in range(-1, n_sae):
                    delta = d_err[p, t] if i < 0 else d_f[p, t, i] * scale[p, t] * spec.weights["W_dec"][i]
                    moved = x_m[p : p + 1].clone()
                    moved[0, t] += delta
                    q2, k2, _ = model.layer_qkv(m, moved)
                    new = atpstar.ops.attention_pattern(q2, k2, args.scaling, args.softcap, args.window)
                    fix = ((new[0] - pattern[p]) * g_a[p]).sum() - (delta * through_qk[p, t]).sum()
                    if i < 0:
                        error[p, t] += fix
                    else:
                        latents[p, i, t] += fix
    return latents, error


def atpstar_reference(model, pairs, spec: Spec, direction: str = "noising"):
    """AtP*: Σ_l |QK-fixed Î_l| / (L - 1); a pass that drops the layer holding the write scores 0."""
    site, layer = site_of(spec.write)
    terms = []
    for drop in range(model.n_layers):
        if site != "resid_pre" and drop == layer:
            continue
        terms.append(qk_fixed(model, pairs, spec, direction, drop))
    return tuple(sum(term[i].abs() for term in terms) / (model.n_layers - 1) for i in range(2))
