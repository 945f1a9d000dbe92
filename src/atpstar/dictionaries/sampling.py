"""Random joint patches of latent and error nodes: the Subsampling statistics of the false-negative bound.

Sample j on pair i patches a random subset of the unverified nodes at once (each in with probability p, from
the sample's own generator, as node Subsampling: ``sweeps.subsampling.random_subset``): every dictionary's
write site gains the sum of its chosen nodes' writes, Σ Δf_i(t) · scale(t) · W_dec[i] + Σ Δerror_t (the
dictionaries spliced in with their error terms). One forward per (sample, pair), started at the earliest
write layer; statistics merge as node Subsampling's (``update_stats``). In-process only.

Shape letters: P pairs, B batch, N nodes (the requested node types, flattened), T positions, S d_sae, D d_model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..batching import BatchGuard
from ..cost import Cost
from ..engine import metric_after
from ..job import Job
from ..nodes import NodeLayout
from ..runner import Run
from ..sweeps.subsampling import SubsamplingStats, keep_mask, random_subset, update_stats
from .dictionary import Dictionary
from .patching import LatentCache, prepare_latents
from .registry import node_types_of
from .sites import run_site


def joint_writes(
    dictionaries: Sequence[Dictionary], cache: LatentCache, masks: Mapping[str, torch.Tensor], pair: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per dictionary, what its chosen nodes add at its write site: [B, T, D] (masks: node type -> [B, *layout])."""
    out = {}
    for d in dictionaries:
        latents, error = node_types_of(d)
        diff = cache.diffs[d.name]
        write = torch.zeros_like(diff.error[pair])  # [B, T, D]
        if latents in masks:
            chosen = masks[latents].transpose(1, 2).to(diff.latents)  # [B, S, T] -> [B, T, S]
            amount = chosen * diff.latents[pair] * diff.scale[pair]  # [B, T, S]
            write = write + amount @ d.W_dec.to(amount.dtype)  # [B, T, D]
        if error in masks:
            write = write + masks[error][..., None].to(write) * diff.error[pair]
        out[d.name] = write
    return out


def joint_patch(
    model: Any, cache: LatentCache, dictionaries: Sequence[Dictionary], writes: Mapping[str, torch.Tensor],
    pair: torch.Tensor, cost: Cost,
) -> torch.Tensor:  # fmt: skip
    """Metric changes [B] with every dictionary's write added at its site, one element per pair index."""
    sites = {(run_site(d.write_hook).layer, run_site(d.write_hook).site): [] for d in dictionaries}  # type: dict
    for d in dictionaries:
        sites[(run_site(d.write_hook).layer, run_site(d.write_hook).site)].append(writes[d.name])
    start = min(layer for layer, _ in sites)

    def patch(layer: int, site: str, x: torch.Tensor, run: Run) -> torch.Tensor:
        for write in sites.get((layer, site), []):
            x = x + write.to(x.device, x.dtype)
        return x

    with torch.inference_mode():
        effect = metric_after(model, cache.patch, patch, start, 0, pair)
    cost.add_forward(len(pair), start_layer=start, n_layers=model.n_layers)
    return effect


def sample_latents(
    job: Job,
    dictionaries: Sequence[Dictionary],
    shapes: dict[str, tuple[int, ...]],
    *,
    samples: int,
    p: float,
    seed: int,
    batch: int,
    exclude: dict[str, torch.Tensor] | None,
) -> tuple[SubsamplingStats, torch.Tensor]:
    """Subsampling statistics over the nodes of ``shapes`` (node type -> layout): (stats, base metric [P])."""
    model, n_pairs = job.model, job.n_pairs
    cache = prepare_latents(model, job.pairs, job.direction, dictionaries, job.cost)
    layout = NodeLayout(shapes)
    keep = keep_mask(layout, exclude)
    values = {name: torch.zeros(n_pairs, layout.size, dtype=torch.float64) for name in
              ("count_in", "mean_in", "m2_in", "count_out", "mean_out", "m2_out")}  # fmt: skip
    guard = BatchGuard("latent subsampling: patched forwards", model.device)
    base_metric = cache.patch.base_metric.detach().double().cpu()

    def run(element: torch.Tensor) -> None:
        pair_index, sample_index = element % n_pairs, element // n_pairs
        chosen = (
            torch.stack([random_subset(layout.size, p, seed, int(j), int(s)) for j, s in zip(pair_index, sample_index)])
            & keep
        )  # fmt: skip  [B, N]
        writes = joint_writes(dictionaries, cache, layout.unflatten(chosen), pair_index)
        metric = joint_patch(model, cache, dictionaries, writes, pair_index, job.cost)
        update_stats(values, chosen, metric.detach().double().cpu() - base_metric[pair_index], pair_index, n_pairs)

    total = samples * n_pairs
    for first in range(0, total, batch):
        element = torch.arange(first, min(first + batch, total))

        def part_of(part: slice, element: torch.Tensor = element) -> None:
            run(element[part])

        guard.run(len(element), part_of)
    return SubsamplingStats(dict(shapes), values), cache.patch.base_metric


def bound_sampler(run: Any) -> tuple[SubsamplingStats, dict[str, Any]]:
    """The false-negative bound's Subsampling over latent nodes (``bound.verb.SAMPLERS["latents"]``), in-process."""
    from ..errors import InputError
    from ..spaces import spaces_for

    if any(value is not None for value in run.engine.values()):
        raise InputError("the bound over dictionary latents runs in-process: drop workers=/ray_address=/checkpoint=")
    space: Any = spaces_for(run.job.model, run.node_types)[0]
    shapes = {t: space.shape(t, run.job.seq_len) for t in run.node_types}
    options = {k: run.options[k] for k in ("samples", "p", "seed")}
    batch = run.batch_size or max(1, int(run.memory_gb * 2**30) // space.element_bytes(run.job))
    stats, _ = sample_latents(run.job, space.ordered, shapes, **options, batch=batch, exclude=run.exclude)
    return stats, {"spaces": {space.kind: space.describe()}}
