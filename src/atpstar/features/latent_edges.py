"""Edges between dictionary latents (Sparse Feature Circuits' edges): exact patching and their AtP estimate.

A dictionary reads and writes one run site (``sites.Placement``); with its error term kept, the site
holds ``decode(f) + error`` and patching latent i at position t adds ``Δf_i W_dec[i]`` there, where
``Δf = f(source) − f(base)``. Dictionaries are taken in forward order; an edge joins a latent
u = (i, t) of one dictionary a to a latent d = (j, t') of the next one b, or a latent of the last
dictionary to the metric.

Exact edge effect (path patching through d alone, Marks et al. 2024 §2 with every other node at base):
    run 1: the base run with u patched at site a, up to site b: f_d' = f_d(patched);
    run 2: the base run with site b changed by (f_d' − f_d(base)) W_dec[j] at t': I(u → d) = m(run 2) − m(base).
The edge to the metric of a latent of the last dictionary is its node effect (patch u, read m).

AtP estimate (the first-order term of the same quantity, at the base run):
    Î(u → d) = Δf_u · (W_dec_a[i] · ∂f_d/∂x_a,t) · (W_dec_b[j] · ∂m/∂x_b,t'),
with ∂f_d/∂x_a one backward from site b to site a per downstream latent (the downstream latents ride in
the batch dimension), and ∂m/∂x_b the gradient of the metric at site b. The edge to the metric:
Î(u → m) = Δf_u (W_dec[i] · ∂m/∂x_a,t), latent AtP.

Cost: one source forward, one base forward and backward; per downstream latent a forward and backward
of the layers between its dictionary and the one above; exact: per (upstream latent, pair) a forward
from site a to site b, per (edge, pair) a forward from site b.

Shape letters: P pairs, T positions, D d_model, S latents of a dictionary, U upstream and N downstream
latents of an edge block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..job import Job
from ..runner import Run
from .sites import Placement, latent_change, placement


class _Stop(Exception):
    """Ends a partial forward once the downstream site is reached."""


@dataclass
class Captured:
    """Base and source runs seen at every dictionary's site.

    Attributes:
        delta: per dictionary [P, T, S] latent activations, source minus base.
        base_latents: per dictionary [P, T, S] base latent activations.
        site_x: per dictionary [P, T, D] the site's base activation (a latent's write scales with it
            under SAELens' normalisations).
        grad: per dictionary [P, T, D] ∂m/∂(site) at the base run.
        resid: residual stream entering each dictionary's layer at the base run, by layer: [P, T, D].
        base_metric: [P] the metric of the base run.
    """

    delta: list[torch.Tensor]
    base_latents: list[torch.Tensor]
    site_x: list[torch.Tensor]
    grad: list[torch.Tensor]
    resid: dict[int, torch.Tensor]
    base_metric: torch.Tensor


def in_forward_order(dictionaries: Sequence[object]) -> list[object]:
    """The dictionaries sorted by where the forward pass reaches their sites."""
    return sorted(dictionaries, key=lambda d: placement(d).order)


def _metric(job: Job, logits: torch.Tensor, pair_index: torch.Tensor) -> torch.Tensor:
    return job.pairs.evaluate_metric(logits[:, -1], pair_index)


def capture(job: Job, dictionaries: Sequence[object]) -> Captured:
    """Source forward, base forward and one backward; latents, their differences and site gradients."""
    model = job.model
    places = [placement(d) for d in dictionaries]
    base_tokens, source_tokens = job.base_and_source()
    seen: dict[tuple[int, str], torch.Tensor] = {}

    def record(layer: int, site: str, x: torch.Tensor, run: Run) -> torch.Tensor:
        if (layer, site) in {p.key for p in places}:
            seen[(layer, site)] = x.detach()
        return x

    with torch.no_grad():
        model.run_layers(model.embed(source_tokens), Run(model.n_layers, patch=record))
    source = {key: x for key, x in seen.items()}
    watch = {
        p.key: torch.zeros(*base_tokens.shape, model.d_model, dtype=model.dtype, requires_grad=True) for p in places
    }
    resid: dict[int, torch.Tensor] = {}

    def watched(layer: int, site: str, x: torch.Tensor, run: Run) -> torch.Tensor:
        if site == "resid_pre" and layer in {p.layer for p in places}:
            resid[layer] = x.detach()
        record(layer, site, x, run)
        return x + watch[(layer, site)] if (layer, site) in watch else x

    with torch.enable_grad():
        logits = model.unembed(model.run_layers(model.embed(base_tokens), Run(model.n_layers, patch=watched)))
        metric = _metric(job, logits, torch.arange(job.n_pairs))
        metric.sum().backward()
    job.cost.add_forward(2 * job.n_pairs)
    job.cost.add_backward(job.n_pairs)
    with torch.no_grad():
        base = [d.encode(seen[p.key]) for d, p in zip(dictionaries, places)]  # type: ignore[attr-defined]
        delta = [d.encode(source[p.key]) - f for d, p, f in zip(dictionaries, places, base)]  # type: ignore[attr-defined]
    grads = [watch[p.key].grad.detach() for p in places]  # type: ignore[union-attr]
    return Captured(delta, base, [seen[p.key] for p in places], grads, resid, metric.detach())


def units(captured: Captured, dictionary: object, index: int, nodes: torch.Tensor) -> torch.Tensor:
    """What one unit of each latent of nodes [U, 2] (latent, pos) adds at its site, per pair: [P, U, D]."""
    site_x = captured.site_x[index][:, nodes[:, 1]]  # [P, U, D]
    flat = site_x.reshape(-1, site_x.shape[-1])  # [P*U, D]
    latent = nodes[:, 0].repeat(site_x.shape[0])  # [P*U]
    return latent_change(dictionary, flat, latent, torch.ones(len(latent))).view(site_x.shape)  # [P, U, D]


def metric_edges_atp(captured: Captured, dictionary: object, index: int, upstream: torch.Tensor) -> torch.Tensor:
    """Î(u → m) for upstream latents [U, 2] (latent, pos) of dictionary number ``index``: [U, P]."""
    unit = units(captured, dictionary, index, upstream)  # [P, U, D]
    grad_at = captured.grad[index][:, upstream[:, 1]]  # [P, U, D]
    delta = captured.delta[index][:, upstream[:, 1], upstream[:, 0]]  # [P, U]
    return (delta * (grad_at * unit).sum(-1)).T  # [U, P]


def latent_edges_atp(
    job: Job, captured: Captured, dictionaries: Sequence[object], index: int, upstream: torch.Tensor,
    downstream: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Î(u → d) from dictionary ``index`` to the next: upstream [U, 2], downstream [N, 2] (latent, pos) -> [U, N, P]."""
    model = job.model
    up, down = dictionaries[index], dictionaries[index + 1]
    at, to = placement(up), placement(down)
    n_down, n_pairs = downstream.shape[0], job.n_pairs
    hidden = captured.resid[at.layer].repeat(n_down, 1, 1)  # [N*P, T, D]
    leaf = torch.zeros_like(hidden, requires_grad=True)
    chosen = downstream.repeat_interleave(n_pairs, dim=0)  # [N*P, 2]
    reached: list[torch.Tensor] = []

    def patch(layer: int, site: str, x: torch.Tensor, run: Run) -> torch.Tensor:
        if (layer, site) == at.key:
            x = x + leaf
        if (layer, site) == to.key:
            latents = down.encode(x)  # type: ignore[attr-defined]  # [N*P, T, S]
            reached.append(latents[torch.arange(len(chosen)), chosen[:, 1], chosen[:, 0]])
            raise _Stop
        return x

    with torch.enable_grad():
        try:
            model.run_layers(hidden, Run(model.n_layers, patch=patch, start_layer=at.layer))
        except _Stop:
            pass
        reached[0].sum().backward()
    covered = to.layer + 1 - at.layer
    job.cost.add_forward(n_down * n_pairs * covered / model.n_layers)
    job.cost.add_backward(n_down * n_pairs * covered / model.n_layers)
    jac = leaf.grad.view(n_down, n_pairs, *hidden.shape[1:])  # type: ignore[union-attr]  # [N, P, T, D]
    unit_up = units(captured, up, index, upstream)  # [P, U, D]
    through = torch.einsum("npud,pud->unp", jac[:, :, upstream[:, 1]], unit_up)  # [U, N, P]
    unit_down = units(captured, down, index + 1, downstream)  # [P, N, D]
    grad_down = captured.grad[index + 1][:, downstream[:, 1]]  # [P, N, D]
    to_metric = (grad_down * unit_down).sum(-1).T  # [N, P]
    delta = captured.delta[index][:, upstream[:, 1], upstream[:, 0]].T  # [U, P]
    return delta[:, None] * through * to_metric[None]  # [U, N, P]


def _site_patch(place: Placement, pos: torch.Tensor, change: torch.Tensor):  # type: ignore[no-untyped-def]
    """A patch adding change [B, D] at position pos [B] of one site."""
    rows = torch.arange(len(pos))

    def patch(layer: int, site: str, x: torch.Tensor, run: Run) -> torch.Tensor:
        if (layer, site) != place.key:
            return x
        x = x.clone()
        x[rows, pos] += change.to(x.dtype)
        return x

    return patch


def _changes(
    captured: Captured, dictionary: object, index: int, nodes: torch.Tensor, pair: torch.Tensor
) -> torch.Tensor:
    """Δf · unit write of each node [U, 2] for each pair, elements ordered (node, pair): [U*P, D]."""
    n_pairs = captured.base_metric.shape[0]
    latent, pos = nodes[:, 0].repeat_interleave(n_pairs), nodes[:, 1].repeat_interleave(n_pairs)  # [U*P]
    unit = units(captured, dictionary, index, nodes)  # [P, U, D]
    node = torch.arange(len(nodes)).repeat_interleave(n_pairs)  # [U*P]
    return captured.delta[index][pair, pos, latent, None] * unit[pair, node]  # [U*P, D]


def exact_metric_edges(
    job: Job, captured: Captured, dictionaries: Sequence[object], index: int, upstream: torch.Tensor
) -> torch.Tensor:
    """I(u → m): the exact node effect of each upstream latent [U, 2] of dictionary ``index``: [U, P]."""
    model, place = job.model, placement(dictionaries[index])
    n_up, n_pairs = upstream.shape[0], job.n_pairs
    pair = torch.arange(n_pairs).repeat(n_up)  # [U*P]
    pos = upstream[:, 1].repeat_interleave(n_pairs)  # [U*P]
    change = _changes(captured, dictionaries[index], index, upstream, pair)  # [U*P, D]
    run = Run(model.n_layers, patch=_site_patch(place, pos, change), start_layer=place.layer)
    with torch.no_grad():
        logits = model.unembed(model.run_layers(captured.resid[place.layer][pair], run))
    job.cost.add_forward(n_up * n_pairs, place.layer, model.n_layers)
    effect = _metric(job, logits, pair) - captured.base_metric[pair]
    return effect.view(n_up, n_pairs).double()  # [U, P]


def exact_latent_edges(
    job: Job, captured: Captured, dictionaries: Sequence[object], index: int, upstream: torch.Tensor,
    downstream: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """I(u → d) by path patching (module docstring), upstream [U, 2] and downstream [N, 2] -> [U, N, P] float64."""
    model = job.model
    up, down = dictionaries[index], dictionaries[index + 1]
    at, to = placement(up), placement(down)
    n_up, n_down, n_pairs = upstream.shape[0], downstream.shape[0], job.n_pairs
    pair = torch.arange(n_pairs).repeat(n_up)  # [U*P]
    pos = upstream[:, 1].repeat_interleave(n_pairs)  # [U*P]
    change = _changes(captured, up, index, upstream, pair)  # [U*P, D]
    first = _site_patch(at, pos, change)
    reached: list[torch.Tensor] = []

    def run_one(layer: int, site: str, x: torch.Tensor, run: Run) -> torch.Tensor:
        x = first(layer, site, x, run)
        if (layer, site) == to.key:
            reached.append(down.encode(x)[:, downstream[:, 1], downstream[:, 0]])  # type: ignore[attr-defined]  # [U*P, N]
            raise _Stop
        return x

    with torch.no_grad():
        try:
            model.run_layers(captured.resid[at.layer][pair], Run(model.n_layers, patch=run_one, start_layer=at.layer))
        except _Stop:
            pass
    job.cost.add_forward(n_up * n_pairs * (to.layer + 1 - at.layer) / model.n_layers)
    base_down = captured.base_latents[index + 1][:, downstream[:, 1], downstream[:, 0]]  # [P, N]
    shift = (reached[0].view(n_up, n_pairs, n_down) - base_down[None]).permute(0, 2, 1)  # [U, N, P]
    # Run 2: one element per (edge, pair), the downstream site changed along d's decoder row.
    unit_down = units(captured, down, index + 1, downstream)  # [P, N, D]
    pair2 = torch.arange(n_pairs).repeat(n_up * n_down)  # [U*N*P]
    down_index = torch.arange(n_down).repeat_interleave(n_pairs).repeat(n_up)  # [U*N*P]
    change2 = shift.reshape(-1, 1) * unit_down[pair2, down_index]  # [U*N*P, D]
    run = Run(model.n_layers, patch=_site_patch(to, downstream[down_index, 1], change2), start_layer=to.layer)
    with torch.no_grad():
        logits = model.unembed(model.run_layers(captured.resid[to.layer][pair2], run))
    job.cost.add_forward(n_up * n_down * n_pairs, to.layer, model.n_layers)
    effect = _metric(job, logits, pair2) - captured.base_metric[pair2]
    return effect.view(n_up, n_down, n_pairs).double()  # [U, N, P]
