"""Exact patching of dictionary latents and error nodes, batched like the engine's node patches.

Patching latent i of a dictionary at position t sets f_i to its source value with every other latent and
the error held at their base values: the write site gains Δf_i · scale(x_t) · W_dec[i] at t (Sparse
Feature Circuits' patch, the dictionary spliced in with its error term, so nothing else changes). Patching
the error node at t adds Δerror_t. One forward per (node, pair), started at the write site's layer and the
patched position from the cached base run (``engine.metric_after``); elements of one layer share batches,
split at changes of position (``engine.plan_chunks``) and on out-of-memory errors (``BatchGuard``).

Cost: 2P forwards for the cache; one forward per (node, pair) counted (L - l) / L at write layer l.

Shape letters: P pairs, B batch, T positions, S d_sae, D d_model, n listed nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..batching import BatchGuard
from ..cost import Cost
from ..engine import MIN_CHUNK_TOKENS, PatchCache, metric_after, plan_chunks
from ..model import Model
from ..ops import upcast
from ..pairs import PromptPairs
from ..runner import Run
from .dictionary import Dictionary
from .screen import encode_many
from .sites import Site, run_site
from .sparse import compressed, delta_times_rows


@dataclass
class Differences:
    """One dictionary's source - base differences on every pair.

    Attributes:
        latents: Δf [P, T, S]; scale: the base run's decoder scale [P, T, 1]; error: Δerror [P, T, D].
        compressed: Δf's nonzeros as CSR [P*T, S] (``sparse.compressed``), or None where Δf is dense.
    """

    latents: torch.Tensor
    scale: torch.Tensor
    error: torch.Tensor
    compressed: torch.Tensor | None = None


def differences(dictionary: Dictionary, source: Run, base: Run) -> Differences:
    """Δf, the base decoder scale and Δerror of ``dictionary`` from two runs recording its sites."""
    read, write = run_site(dictionary.hook), run_site(dictionary.write_hook)
    x_src, x_base = (upcast(run.get(read.site, read.layer).detach()) for run in (source, base))
    y_src, y_base = (upcast(run.get(write.site, write.layer).detach()) for run in (source, base))
    f_src, f_base = encode_many(dictionary, torch.cat([x_src, x_base])).chunk(2)  # [2P, T, S] -> [P, T, S] x2
    delta = f_src - f_base
    sparse = compressed(delta)
    if dictionary.normalize_activations == "none":
        # write(f, x) = f W_dec + b_dec (+ x W_skip): its change is Δf W_dec (+ Δx W_skip), and Δf is sparse.
        change = delta_times_rows(delta, dictionary.W_dec.to(delta.device, delta.dtype), sparse)  # [P, T, D]
        if dictionary.W_skip is not None:
            change = change + (x_src - x_base) @ dictionary.W_skip.to(delta.device, delta.dtype)
        return Differences(delta, dictionary.decoder_scale(x_base), (y_src - y_base) - change, sparse)
    err_src = y_src - dictionary.write(f_src, x_src)
    err_base = y_base - dictionary.write(f_base, x_base)
    return Differences(delta, dictionary.decoder_scale(x_base), err_src - err_base, sparse)


def dictionary_sites(dictionaries: Sequence[Dictionary]) -> list[str]:
    """The run sites the dictionaries read and write (what both runs must record)."""
    return list(dict.fromkeys(run_site(h).site for d in dictionaries for h in (d.hook, d.write_hook)))


@dataclass
class LatentCache:
    """The engine's base-run cache (the residual stream of every layer, keys, values) and each dictionary's
    differences."""

    patch: PatchCache
    diffs: dict[str, Differences]


def prepare_latents(
    model: Model, pairs: PromptPairs, direction: str, dictionaries: Sequence[Dictionary], cost: Cost
) -> LatentCache:
    """Run the base and source prompts once each (2P forwards) and cache what latent patches need."""
    base_tokens, source_tokens = pairs.base_and_source(direction)
    sites = dictionary_sites(dictionaries)
    with torch.inference_mode():
        base = Run(model.n_layers, record=("resid_pre", "k", "v", *sites))
        final = model.run_layers(model.embed(base_tokens), base)
        logits = model.unembed(final[:, -1])
        base_metric = pairs.evaluate_metric(logits, torch.arange(pairs.n_pairs, device=logits.device))
        source = Run(model.n_layers, record=sites)
        model.run_layers(model.embed(source_tokens), source)
        diffs = {d.name: differences(d, source, base) for d in dictionaries}
    cost.add_forward(2 * pairs.n_pairs)
    resid = list(base.records["resid_pre"][: model.n_layers])
    patch = PatchCache(resid, list(base.records["k"]), list(base.records["v"]), {}, base_metric, pairs)
    return LatentCache(patch, diffs)


@dataclass(frozen=True)
class Elements:
    """Single-node patches, one per (node, pair): which dictionary, latent (-1: the error), pair and position."""

    dictionary: torch.Tensor  # [B] index into the dictionaries
    latent: torch.Tensor  # [B]
    pair: torch.Tensor  # [B]
    pos: torch.Tensor  # [B]

    def __getitem__(self, rows: Any) -> Elements:
        return Elements(self.dictionary[rows], self.latent[rows], self.pair[rows], self.pos[rows])

    def __len__(self) -> int:
        return len(self.pair)


def write_deltas(dictionaries: Sequence[Dictionary], cache: LatentCache, elements: Elements) -> torch.Tensor:
    """What each element adds at its write site: [B, D] (Δf_i · scale · W_dec[i], or Δerror)."""
    d_model = cache.patch.resid[0].shape[-1]
    like = next(iter(cache.diffs.values())).error
    deltas = torch.zeros(len(elements), d_model, dtype=like.dtype, device=like.device)
    for index, dictionary in enumerate(dictionaries):
        rows = torch.nonzero(elements.dictionary == index)[:, 0]
        if len(rows) == 0:
            continue
        diff, part = cache.diffs[dictionary.name], elements[rows]
        error = part.latent < 0
        deltas[rows[error]] = diff.error[part.pair[error], part.pos[error]]  # [b, D]
        latent, pair, pos = part.latent[~error], part.pair[~error], part.pos[~error]
        amount = diff.latents[pair, pos, latent] * diff.scale[pair, pos, 0]  # [b]
        deltas[rows[~error]] = amount[:, None] * dictionary.W_dec[latent].to(deltas)  # [b, D]
    return deltas


def patch_batch(
    model: Model,
    cache: LatentCache,
    write: Site,
    sites: list[str],
    deltas: torch.Tensor,
    elements: Elements,
    cost: Cost,
) -> torch.Tensor:
    """Metric changes [B] of one batch of single-node patches, all at write layer ``write.layer``.

    ``sites`` [B] names each element's write site; ``deltas`` [B, D] what it adds there at its position.
    """
    t0 = int(elements.pos.min())
    rows = torch.arange(len(elements))

    def patch(layer: int, site: str, x: torch.Tensor, run: Run) -> torch.Tensor:
        if layer != write.layer or site not in sites:
            return x
        mine = torch.tensor([s == site for s in sites], dtype=torch.bool)
        index = (rows[mine].to(x.device), (elements.pos[mine] - t0).to(x.device))  # into x [B, T', D]
        return x.index_put(index, deltas[mine].to(x.device, x.dtype), accumulate=True)

    with torch.inference_mode():
        effect = metric_after(model, cache.patch, patch, write.layer, t0, elements.pair)
    cost.add_forward(len(elements), start_layer=write.layer, n_layers=model.n_layers)
    return effect


def patch_listed_latents(
    model: Model,
    cache: LatentCache,
    dictionaries: Sequence[Dictionary],
    nodes: Elements,
    batch: int,
    cost: Cost,
    advance: Callable[[int], Any] | None = None,
) -> torch.Tensor:
    """Exact effects [n, P] float64 of n listed nodes (``nodes.pair`` unused) on every pair, batched by layer."""
    n_nodes, n_pairs = len(nodes), cache.patch.n_pairs
    effects = torch.zeros(n_nodes, n_pairs, dtype=torch.float64)
    ranks = torch.arange(n_nodes).repeat_interleave(n_pairs)
    everything = Elements(
        nodes.dictionary.repeat_interleave(n_pairs), nodes.latent.repeat_interleave(n_pairs),
        torch.arange(n_pairs).repeat(n_nodes), nodes.pos.repeat_interleave(n_pairs),
    )  # fmt: skip
    writes = [run_site(d.write_hook) for d in dictionaries]
    layer_of = torch.tensor([writes[int(i)].layer for i in everything.dictionary], dtype=torch.long)  # [n * P]
    for layer in torch.unique(layer_of).tolist():
        rows = torch.nonzero(layer_of == layer)[:, 0]
        rows = rows[torch.sort(everything.pos[rows], stable=True).indices]  # by position: batches start late
        guard = BatchGuard(f"latent patches at layer {layer}", model.layer_device(int(layer)))
        for part in plan_chunks(everything.pos[rows], batch, MIN_CHUNK_TOKENS, cache.patch.pairs.seq_len):
            chunk = rows[part]

            def run(sub: slice, chunk: torch.Tensor = chunk) -> tuple[torch.Tensor, torch.Tensor]:
                elements = everything[chunk[sub]]
                sites = [writes[int(i)].site for i in elements.dictionary]
                deltas = write_deltas(dictionaries, cache, elements)
                return chunk[sub], patch_batch(model, cache, Site("", int(layer)), sites, deltas, elements, cost)

            for done, effect in guard.run(len(chunk), run):
                effects[ranks[done], everything.pair[done]] = effect.detach().double().cpu()
                if advance is not None:
                    advance(len(done))
    return effects
