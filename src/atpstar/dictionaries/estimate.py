"""Gradient estimates over dictionary latents, on the shared gradient step (``atpstar.gradients``).

With the error term kept, a dictionary's write site y = write(f) + error, so ∂L/∂f_i = scale · W_dec[i] · ∂L/∂y
and ∂L/∂error = ∂L/∂y. The latent pullback of the gradient at the write site:

    Î(latent i, t) = Δf_i(t) · scale(t) · (W_dec[i] · ∂L/∂y_t)          (AtP; on a path the mean gradient)
    Î(error, t)    = Δerror_t · ∂L/∂y_t

with Δ = source - base of the real runs. ``gradient_step`` runs both prompts (both runs keep the
dictionaries' read and write sites), hands each write site's gradient to the consumer as autograd forms it,
and runs GradDrop's partial backwards: a latent at write layer m scores (m · |Î| + Σ_{l>m} |Î_l|) / (L - 1),
as site nodes at that run site do (``gradients.consumers``). The QK fix is ``dictionaries.qkfix``.

Cost per pair: as AtP on site nodes (2 forwards + 1 backward; GradDrop adds the partial backwards; a path
of m points adds m forwards and m - 1 backwards); the QK fix adds one q/k projection per changed latent.

Shape letters: P pairs, b pairs in a step, T positions, S d_sae, D d_model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..batching import BatchGuard
from ..cost import Cost
from ..gradients import AT_BASE, Points, gradient_step, summed_over_points
from ..job import Job
from ..ops import graddrop_combine, upcast
from ..progress import progress_bar
from .dictionary import Dictionary
from .patching import Differences, dictionary_sites, differences
from .qkfix import FIX_SITES, LatentQKFix
from .registry import node_types_of
from .sites import run_site
from .sparse import delta_times_pullback


def latent_pullback(
    dictionary: Dictionary, diff: Differences, grad: torch.Tensor, points: Points = AT_BASE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents [b, S, T], error [b, T]) estimates from the gradient ∂L/∂y [b, T, D] at the write site."""
    grad = upcast(grad.detach())
    rows = dictionary.W_dec.to(grad.device, grad.dtype)  # [S, D]
    pulled = delta_times_pullback(diff.latents, grad * diff.scale, rows, diff.compressed)  # Δf ⊙ (g W_decᵀ): [b, T, S]
    latents = points.mean(pulled).transpose(1, 2)  # [b, T, S] -> [b, S, T]
    error = points.mean(diff.error * grad).sum(-1)  # [b, T]
    return latents, error


def estimate_step(
    job: Job, dictionaries: Sequence[Dictionary], index: torch.Tensor, grad_drop: bool, qk_fix: bool, points: Points
) -> tuple[dict[str, torch.Tensor], Cost]:
    """Estimates of every latent and error node of ``dictionaries`` on pairs ``index``: (node type -> [b, *layout],
    the passes the QK fix added to ``job.cost``)."""
    model, n_layers = job.model, job.model.n_layers
    writes = {d.name: run_site(d.write_hook) for d in dictionaries}
    at_site: dict[tuple[int, str], list[Dictionary]] = {}
    for d in dictionaries:
        at_site.setdefault((writes[d.name].layer, writes[d.name].site), []).append(d)
    fix_sites = ("resid_pre", *FIX_SITES) if qk_fix else ()
    sites = list(dict.fromkeys([*dictionary_sites(dictionaries), *fix_sites]))
    grad_sites = list(dict.fromkeys([*(w.site for w in writes.values()), *fix_sites[1:]]))
    kept: dict[str, list[torch.Tensor]] = {}
    pass_grads: dict[tuple[int, str], torch.Tensor] = {}  # this pass's gradients at the QK fix's layers
    with gradient_step(
        model, job.pairs, index, direction=job.direction, sites=sites, diff_sites=[], grad_sites=grad_sites,
        cost=job.cost, grad_drop=grad_drop, points=points,
    ) as step:  # fmt: skip
        diffs = {d.name: differences(d, step.source, step.base) for d in dictionaries}
        fix = LatentQKFix(model, step, dictionaries, diffs) if qk_fix else None

        def estimate(d: Dictionary, grad: torch.Tensor, fixed: bool = True) -> list[torch.Tensor]:
            # The QK fix: the linear term through layer m's queries and keys leaves the pulled-back gradient,
            # the exact change of the pattern takes its place.
            qk = fix.through_qk(d, pass_grads) if fix is not None and fixed else None
            if qk is not None:
                grad = upcast(grad.detach()) - qk.to(grad.device)
            latents, error = latent_pullback(d, diffs[d.name], grad, step.points)
            if fix is not None and qk is not None:
                exact = fix.exact(d, pass_grads, d.d_sae)
                latents, error = latents + exact[0].to(latents), error + exact[1].to(error)
            return [latents, error]

        def consume(layer: int, site: str, grad: torch.Tensor) -> None:
            if site in FIX_SITES:
                pass_grads[(layer, site)] = upcast(grad.detach())
            for d in at_site.get((layer, site), []):
                kept[d.name] = estimate(d, grad)

        if not grad_drop:
            step.backward(summed_over_points(step, consume))
        else:
            _graddrop(step, at_site, estimate, kept, pass_grads)
    out = {}
    for d in dictionaries:
        latents, error = kept[d.name]
        if grad_drop:
            latents, error = graddrop_combine(latents, n_layers), graddrop_combine(error, n_layers)
        out.update(dict(zip(node_types_of(d), (latents, error))))
    extra = fix.cost if fix is not None else Cost()
    job.cost.forward, job.cost.backward = job.cost.forward + extra.forward, job.cost.backward + extra.backward
    return out, extra


def _graddrop(step, at_site, estimate, kept, pass_grads) -> None:  # type: ignore[no-untyped-def]
    """GradDrop's running sums Σ_l |Î_l| (Kramár et al. 2024 §5) over the L dropped layers l.

    A latent at write layer m keeps its plain estimate for the m layers below it, and gets its terms for layers
    above it from the partial backwards. Its own layer: a write inside layer m (attn_out, mlp_out, resid_mid,
    mlp_in) is dropped with it (0); the stream entering layer m (resid_pre) then passes through unchanged, so
    its gradient is ∂L/∂resid_pre_{m+1} of the full backward (and no path through layer m's attention).
    ``pass_grads`` holds the running pass's gradients at the QK fix's sites; each pass starts it empty.
    """
    passed: dict[str, list[torch.Tensor]] = {}  # resid_pre latents: the own-layer term

    def start(layer: int, site: str, grad: torch.Tensor) -> None:
        if site in FIX_SITES:
            pass_grads[(layer, site)] = upcast(grad.detach())
        for d in at_site.get((layer, site), []):
            kept[d.name] = [layer * est.abs() for est in estimate(d, grad)]
        for d in at_site.get((layer - 1, site), []) if site == "resid_pre" else []:
            passed[d.name] = [est.abs() for est in estimate(d, grad, fixed=False)]

    def add(layer: int, site: str, grad: torch.Tensor) -> None:
        if site in FIX_SITES:
            pass_grads[(layer, site)] = upcast(grad.detach())
        for d in at_site.get((layer, site), []):
            for total, est in zip(kept[d.name], estimate(d, grad)):
                total.add_(est.abs())

    final = step.base.records.get("resid_pre", [None])[-1]
    if any(site == "resid_pre" and layer == step.tape.n_layers - 1 for layer, site in at_site) and final is not None:
        step.tape.watch(step.tape.n_layers, "resid_pre", final)  # the final stream: the run does not watch it
    step.backward(start)
    pass_grads.clear()
    for name, terms in passed.items():
        for total, term in zip(kept[name], terms):
            total.add_(term)
    for _ in step.dropped(add):
        pass_grads.clear()


def latent_estimates(
    job: Job,
    dictionaries: Sequence[Dictionary],
    *,
    grad_drop: bool = False,
    qk_fix: bool = False,
    points: Points = AT_BASE,
    batch_size: int | None = None,
    label: str = "latents",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per-pair estimates over every latent and error node: (node type -> [P, *layout] (``node_types_of``), info
    with the passes the QK fix added, ``latent_qk_fix_cost``, which depend on how many latents changed)."""
    pairs = job.pairs
    parts: dict[str, list[torch.Tensor]] = {}
    extra = Cost()
    guard = BatchGuard(f"{label}: pairs", job.model.device)
    guard.limit = batch_size or pairs.n_pairs

    def step(part: slice) -> None:
        index = torch.arange(part.start, part.stop)
        estimates, spent = estimate_step(job, dictionaries, index, grad_drop, qk_fix, points)
        extra.forward, extra.backward = extra.forward + spent.forward, extra.backward + spent.backward
        for t, est in estimates.items():
            parts.setdefault(t, []).append(est.detach().cpu())
        bar.update(len(index))

    with progress_bar(pairs.n_pairs, label, job.progress, unit="pair") as bar:
        guard.run(pairs.n_pairs, step)
    info = {"latent_qk_fix_cost": extra.to_dict()} if qk_fix else {}
    return {t: torch.cat(p) for t, p in parts.items()}, info
