"""Exact activation patching: many patched nodes per forward, each forward started late.

A patched forward for a node at layer l and position t starts at layer l from the cached base
residual stream and computes only positions >= t0 (the smallest patched position in the batch):
a causal model cannot change earlier positions, whose keys/values come from the cache. Only the
answer position goes through the unembedding (``PromptPairs.answer_metric``).

Shape letters: P pairs, B batch, L layers, H heads, K kv-heads, T positions, E d_head, D d_model, M d_mlp.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .batching import BatchGuard
from .cost import Cost
from .devices import HOST_MEMORY
from .model import Model
from .nodes import NODE_TABLE, layout_index
from .pairs import PromptPairs
from .runner import PatchFn, Run

# A batch of patched forwards may end at a change of position once it holds this many token-rows.
MIN_CHUNK_TOKENS = 512


@dataclass
class PatchCache:
    """Base-run state every patched forward starts from, and the source activations patched in.

    Attributes:
        resid: per layer, base residual stream entering it [P, T, D].
        keys, values: per layer, base post-rotary keys/values [P, K, T, E].
        source: node type -> per layer source activation ([P, H|K, T, E], or [P, T, M] for neurons).
        base_metric: [P] metric of the unpatched base run.
    """

    resid: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    source: dict[str, list[torch.Tensor]]
    base_metric: torch.Tensor
    pairs: PromptPairs

    @property
    def n_pairs(self) -> int:
        return int(self.base_metric.shape[0])


def prepare(
    model: Model, pairs: PromptPairs, direction: str, node_types: list[str], cost: Cost, chunk: int | None = None
) -> PatchCache:
    """Run the base and source prompts once each and cache what patched forwards need (2P forwards).

    Args:
        chunk: the caller's batch of patched forwards (None: all pairs in one forward). A forward's own
            activations are about as large as a patched forward's (``element_bytes``), but a chunk also holds
            its records until they are copied into the cache: ``prepare_step`` runs fewer pairs per forward so
            that records and activations together fit what ``chunk`` patched forwards take.
    """
    base_tokens, source_tokens = pairs.base_and_source(direction)
    sites = [NODE_TABLE[t].site for t in node_types]
    step = pairs.n_pairs if chunk is None else prepare_step(model, pairs.seq_len, node_types, chunk)
    joined: dict[str, list[Any]] = {}  # "base.<site>" / "source.<site>" -> per layer [P, ...]
    base_metric = torch.zeros(0)
    for start in range(0, pairs.n_pairs, step):
        index = torch.arange(start, min(start + step, pairs.n_pairs))
        base, source, metric = _prepare_chunk(model, pairs, base_tokens[index], source_tokens[index], index, sites)
        base = {**base, "resid_pre": base["resid_pre"][: model.n_layers]}  # the final residual stream is not kept
        HOST_MEMORY.release(model.device)  # the chunk's freed activations go back before the next one
        runs = {**{f"base.{k}": v for k, v in base.items()}, **{f"source.{k}": v for k, v in source.items()}}
        if step >= pairs.n_pairs:  # one chunk: its records are the cache (no copy)
            joined, base_metric = {key: list(records) for key, records in runs.items()}, metric
            break
        # Later chunks are copied into tensors for all pairs, so the cache is never held twice.
        for key, records in runs.items():
            slots = joined.setdefault(key, [_for_all(r, pairs.n_pairs) for r in records])
            for slot, record in zip(slots, records):
                if slot is not None:
                    slot[start : start + len(index)] = record
        base_metric = _for_all(metric, pairs.n_pairs) if start == 0 else base_metric
        base_metric[start : start + len(index)] = metric
    cost.add_forward(2 * pairs.n_pairs)
    source_of = {t: joined[f"source.{NODE_TABLE[t].site}"] for t in node_types}
    return PatchCache(joined["base.resid_pre"], joined["base.k"], joined["base.v"], source_of, base_metric, pairs)


def prepare_step(model: Model, seq_len: int, node_types: list[str], chunk: int) -> int:
    """Pairs per base/source forward of ``prepare`` within the memory of ``chunk`` patched forwards: a pair's
    forward activations (``element_bytes``) plus its records (``cache_bytes``) while they are copied."""
    element = element_bytes(model, seq_len)
    return max(1, chunk * element // (element + cache_bytes(model, 1, seq_len, node_types)))


def _prepare_chunk(
    model: Model, pairs: PromptPairs, base_tokens: torch.Tensor, source_tokens: torch.Tensor, index: torch.Tensor,
    sites: list[str],
) -> tuple[Mapping[str, list[Any]], Mapping[str, list[Any]], torch.Tensor]:  # fmt: skip
    """One chunk's base records, source records and base metric [b]."""
    with torch.inference_mode():
        base_run = Run(model.n_layers, record=("resid_pre", "k", "v"))
        final = model.run_layers(model.embed(base_tokens), base_run)
        base_metric = pairs.answer_metric(model, final, index)
        source_run = Run(model.n_layers, record=sites)
        model.run_layers(model.embed(source_tokens), source_run)
    return base_run.records, source_run.records, base_metric


def _for_all(record: Any, n_pairs: int) -> Any:
    """An empty tensor like ``record`` [b, ...] for all pairs, [P, ...] (None stays None)."""
    return None if record is None else record.new_empty((n_pairs, *record.shape[1:]))


def metric_after(
    model: Model, cache: PatchCache, patch: PatchFn, layer: int, t0: int, pair_index: torch.Tensor
) -> torch.Tensor:
    """Metric change [B] for base pairs ``pair_index`` [B] of a forward patched by ``patch``, started at
    ``layer`` and position ``t0`` from the cached base run."""
    prefix_kv = {}
    if t0 > 0:
        for later in range(layer, model.n_layers):
            # A sliding-window layer's queries >= t0 see no key before t0 - window + 1: keep only those.
            window = model.attention_args[later].window
            first = 0 if window is None else max(0, t0 - window + 1)
            prefix_kv[later] = (
                cache.keys[later][pair_index, :, first:t0],  # [B, K, t0 - first, E]
                cache.values[later][pair_index, :, first:t0],
            )
    run = Run(model.n_layers, patch=patch, start_layer=layer, start_pos=t0, prefix_kv=prefix_kv)
    hidden = cache.resid[layer][pair_index, t0:]  # [B, T', D]
    final = model.run_layers(hidden, run)
    return cache.pairs.answer_metric(model, final, pair_index) - cache.base_metric[pair_index].to(final.device)


def patch_node_batch(
    model: Model,
    cache: PatchCache,
    layer: int,
    node_types: list[str],
    type_index: torch.Tensor,
    pair_index: torch.Tensor,
    unit_index: torch.Tensor,
    pos_index: torch.Tensor,
    cost: Cost,
) -> torch.Tensor:
    """Effects [B] of patching one node per batch element; elements may mix node types of one layer.

    Args:
        node_types: the types ``type_index`` refers to.
        type_index: [B] index into ``node_types`` of each element's type.
        pair_index, unit_index, pos_index: [B] pair, head/kv-head/neuron, and position of each element.
    """
    t0 = int(pos_index.min())
    patches: dict[str, tuple[tuple[torch.Tensor, ...], torch.Tensor]] = {}
    for i, node_type in enumerate(node_types):
        rows = torch.nonzero(type_index == i)[:, 0]
        if len(rows) == 0:
            continue
        pair, unit, pos = pair_index[rows], unit_index[rows], pos_index[rows]
        source = cache.source[node_type][layer]  # [P, T, M] or [P, H|K, T, E]
        at = (rows, *layout_index(node_type, None, unit, pos - t0))  # into the site [B, T', M] or [B, H|K, T', E]
        read = (pair, *layout_index(node_type, None, unit, pos))
        patches[NODE_TABLE[node_type].site] = (at, source[read])

    def patch(at_layer: int, at_site: str, x: torch.Tensor, run: Run) -> torch.Tensor:
        if at_layer != layer or at_site not in patches:
            return x
        index, values = patches[at_site]
        return x.index_put(tuple(i.to(x.device) for i in index), values.to(x.device, x.dtype))

    with torch.inference_mode():
        effect = metric_after(model, cache, patch, layer, t0, pair_index)
    cost.add_forward(len(pair_index), start_layer=layer, n_layers=model.n_layers)
    return effect


def sweep_layer(
    model: Model,
    cache: PatchCache,
    layer: int,
    node_types: list[str],
    nodes: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    max_batch: int,
    cost: Cost,
    min_tokens: int = MIN_CHUNK_TOKENS,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Exact effects of single nodes at one layer, batched by position so batches start late.

    Args:
        nodes: (type_index, pair_index, unit_index, pos_index), each [N], as ``patch_node_batch`` takes.

    Yields:
        (element indices [B] into the N nodes, their effects [B]) as each batch completes.
    """
    type_index, pair_index, unit_index, pos_index = nodes
    order = torch.sort(pos_index, stable=True).indices
    guard = BatchGuard(f"patched forwards at layer {layer}", model.layer_device(layer))
    for part in plan_chunks(pos_index[order], max_batch, min_tokens, cache.pairs.seq_len):
        chunk = order[part]

        def run(sub: slice, chunk: torch.Tensor = chunk) -> tuple[torch.Tensor, torch.Tensor]:
            elements = chunk[sub]
            parts = (type_index[elements], pair_index[elements], unit_index[elements], pos_index[elements])
            return elements, patch_node_batch(model, cache, layer, node_types, *parts, cost)

        yield from guard.run(len(chunk), run)  # one (elements, effects) per batch that fit


def plan_chunks(pos_index: torch.Tensor, max_batch: int, min_tokens: int, seq_len: int) -> list[slice]:
    """Split elements sorted by position into batches: a new batch starts at a position change once
    the current one holds ``min_tokens`` token-rows (later starts save compute), or at ``max_batch``."""
    chunks, start, tokens = [], 0, 0
    positions = pos_index.tolist()
    for i, pos in enumerate(positions):
        full = i - start >= max_batch
        worth_splitting = i > start and pos != positions[i - 1] and tokens >= min_tokens
        if full or worth_splitting:
            chunks.append(slice(start, i))
            start, tokens = i, 0
        tokens += seq_len - positions[start]
    if start < len(positions):
        chunks.append(slice(start, len(positions)))
    return chunks


def patch_masks(
    model: Model,
    cache: PatchCache,
    masks: dict[str, torch.Tensor],
    pair_index: torch.Tensor,
    cost: Cost,
    guard: BatchGuard | None = None,
) -> torch.Tensor:
    """Metric change [B] when every node set in ``masks`` is patched jointly, one node set per element.

    Args:
        masks: node type -> bool [B, *layout] (layouts as in ``nodes``); types may be omitted.
        pair_index: [B] the pair each node set is patched on.
        guard: splits the batch on CUDA out-of-memory errors (pass one per run so it remembers the size).
    """
    guard = guard or BatchGuard("patched forwards", model.device)
    parts = guard.run(
        len(pair_index),
        lambda part: _patch_masks_once(model, cache, {t: m[part] for t, m in masks.items()}, pair_index[part], cost),
    )
    return torch.cat([p.to(parts[0].device) for p in parts])


def _patch_masks_once(
    model: Model, cache: PatchCache, masks: dict[str, torch.Tensor], pair_index: torch.Tensor, cost: Cost
) -> torch.Tensor:
    active = {t: m for t, m in masks.items() if bool(m.any())}
    if not active:
        return torch.zeros(len(pair_index), dtype=cache.base_metric.dtype)
    layers = [int(torch.nonzero(m.transpose(0, 1).flatten(1).any(1))[0]) for m in active.values()]  # [L, B*rest]
    start_layer = min(layers)
    start_pos = min(_first_pos(t, m) for t, m in active.items())
    by_site = {NODE_TABLE[t].site: (t, m) for t, m in active.items()}

    def patch(layer: int, site: str, x: torch.Tensor, run: Run) -> torch.Tensor:
        if site not in by_site:
            return x
        node_type, mask = by_site[site]
        row = NODE_TABLE[node_type]
        n_pos = x.shape[row.pos_axis]
        source = cache.source[node_type][layer][pair_index].narrow(row.pos_axis, start_pos, n_pos)  # like x
        chosen = mask[:, layer].narrow(row.pos_axis, start_pos, n_pos)  # [B, T', M] or [B, H|K, T']
        if row.vector:
            chosen = chosen[..., None]  # [B, H|K, T', 1]
        return torch.where(chosen.to(x.device), source.to(x.device, x.dtype), x)

    with torch.inference_mode():
        effect = metric_after(model, cache, patch, start_layer, start_pos, pair_index)
    cost.add_forward(len(pair_index), start_layer=start_layer, n_layers=model.n_layers)
    return effect


def _first_pos(node_type: str, mask: torch.Tensor) -> int:
    """Smallest position set anywhere in a [B, *layout] mask."""
    pos_dim = 1 + NODE_TABLE[node_type].pos_axis
    other = [d for d in range(mask.ndim) if d != pos_dim]
    return int(torch.nonzero(mask.permute(pos_dim, *other).flatten(1).any(1))[0])  # [T, B*rest] -> first T


def site_elems(model: Model, site: str, seq_len: int) -> int:
    """Elements of one pair's activation at a runner site, one layer."""
    s = model.sizes
    per_token = {
        "neuron": s.d_mlp,
        "q": s.n_heads * s.d_head,
        "z": s.n_heads * s.d_head,
        "k": s.n_kv_heads * s.d_head,
        "v": s.n_kv_heads * s.d_head,
        "pattern": s.n_heads * seq_len,
        **dict.fromkeys(("resid_pre", "attn_proj", "attn_out", "resid_mid", "mlp_in", "mlp_out"), s.d_model),
    }[site]
    return per_token * seq_len


def cache_bytes(model: Model, n_pairs: int, seq_len: int, node_types: list[str]) -> int:
    """``prepare``'s cache: base residual stream, keys and values, and source activations of all pairs."""
    s, item = model.sizes, torch.finfo(model.dtype).bits // 8
    base = s.n_layers * seq_len * (s.d_model + 2 * s.n_kv_heads * s.d_head)
    source = s.n_layers * sum(site_elems(model, NODE_TABLE[t].site, seq_len) for t in node_types)
    return n_pairs * (base + source) * item


def element_bytes(model: Model, seq_len: int) -> int:
    """Rough memory of one patched forward element (activations of one layer plus the KV prefix)."""
    s = model.sizes
    item = torch.finfo(model.dtype).bits // 8
    per_layer = seq_len * (6 * s.d_model + 3 * s.d_mlp + 3 * s.n_heads * seq_len + 4 * s.n_heads * s.d_head)
    prefix = 2 * s.n_layers * s.n_kv_heads * seq_len * s.d_head
    return (per_layer + prefix) * item


def patch_listed(
    model: Model,
    cache: PatchCache,
    node_types: list[str],
    ranked: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    batch: int,
    cost: Cost,
    advance: Any = None,
) -> torch.Tensor:
    """Exact effects [N, P] float64 of N listed site nodes on every pair of ``cache``, batched by layer.

    Args:
        ranked: (type index into ``node_types``, layer, head/kv-head/neuron, position), each [N].
    """
    type_index, layer_index, unit_index, pos_index = ranked
    n_nodes, n_pairs = len(type_index), cache.n_pairs
    effects = torch.zeros(n_nodes, n_pairs, dtype=torch.float64)
    # One element per (node, pair): the node's rank, then the engine's node tuple.
    ranks = torch.arange(n_nodes).repeat_interleave(n_pairs)
    pair_i = torch.arange(n_pairs).repeat(n_nodes)
    type_i, layer_i = type_index.repeat_interleave(n_pairs), layer_index.repeat_interleave(n_pairs)
    unit_i, pos_i = unit_index.repeat_interleave(n_pairs), pos_index.repeat_interleave(n_pairs)
    for layer in torch.unique(layer_i).tolist():
        rows = torch.nonzero(layer_i == layer)[:, 0]
        group = (type_i[rows], pair_i[rows], unit_i[rows], pos_i[rows])
        for chunk, effect in sweep_layer(model, cache, int(layer), node_types, group, batch, cost):
            effects[ranks[rows[chunk]], pair_i[rows[chunk]]] = effect.detach().double().cpu()
            if advance is not None:
                advance(len(chunk))
    return effects
