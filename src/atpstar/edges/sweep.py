"""The edge forms of the registered methods: an exact sweep over every edge (resumable) and the
gradient estimators batched over pairs. Method classes call these from ``_attribute_edges``.

Position-resolved edges (``positions=True``, the methods' ``edge_positions`` option): edge s -> r at
position t carries only the sender's difference at residual position t (the sender's position, as
EAP-IG defines position-resolved edges); results gain a last axis [.., T].

Shape letters: P pairs, N edges, T positions.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..cost import Cost
from ..errors import InputError
from ..model import Model
from ..pairs import PromptPairs
from ..progress import progress_bar
from .atpstar import edge_atp
from .eap import eap
from .graph import graph_of
from .patching import edge_bytes, patch_edges, prepare_edges
from .sites import head_out_weights

# Seconds between checkpoint writes of an exact sweep.
SAVE_EVERY_S = 30.0


def exact_edges(
    model: Model,
    pairs: PromptPairs,
    direction: str,
    cost: Cost,
    progress: bool,
    batch_size: int | None,
    memory_gb: float,
    checkpoint: str | None,
    positions: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Exact effect [P, N] (``positions``: [P, N, T]) of patching every edge alone; partial results go
    to ``checkpoint``."""
    graph = graph_of(model)
    cache = prepare_edges(model, graph, pairs, direction, cost)
    batch = batch_size or max(1, int(memory_gb * 2**30 // edge_bytes(model, pairs.seq_len)))
    key = f"edges|{model.model_id}|{pairs.fingerprint()}|{direction}|{graph.n_edges}"
    shape = (pairs.n_pairs, graph.n_edges, *((pairs.seq_len,) if positions else ()))
    effects, done = _load(checkpoint, key, shape, cache.base_metric.dtype)
    layer_of_edge = torch.tensor([graph.receiver_layer(r) for r in graph.receiver_index.tolist()])
    layer_of_item = layer_of_edge[:, None].expand(shape[1:]) if positions else layer_of_edge  # [N(, T)]
    last_save = time.monotonic()
    try:
        with progress_bar(int((~done).sum()), "exact edge patching", progress, unit="edge") as bar:
            for layer in range(model.n_layers + 1):
                todo = torch.nonzero(~done & (layer_of_item == layer)[None])  # [n, 2 or 3]: pair, edge(, pos)
                for start in range(0, len(todo), batch):
                    item = todo[start : start + batch]
                    p, e = item[:, 0], item[:, 1]
                    pos = item[:, 2] if positions else None
                    where = tuple(item.T)
                    effects[where] = patch_edges(model, cache, layer, p, e, cost, pos).to(effects.dtype).cpu()
                    done[where] = True
                    bar.update(len(p))
                    if checkpoint and time.monotonic() - last_save > SAVE_EVERY_S:
                        _save(checkpoint, key, effects, done)
                        last_save = time.monotonic()
    except BaseException:
        if checkpoint:
            _save(checkpoint, key, effects, done)
        raise
    if checkpoint:
        _save(checkpoint, key, effects, done)
    return effects, {"base_metric": cache.base_metric.tolist()}


def estimate_edges(
    model: Model,
    pairs: PromptPairs,
    direction: str,
    cost: Cost,
    progress: bool,
    batch_size: int | None,
    memory_gb: float,
    qk_fix: bool = False,
    grad_drop: bool = False,
    ig_steps: int | None = None,
    positions: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Edge AtP (EAP), its QK fix / GradDrop / AtP* forms, or EAP-IG: [P, N] (``positions``: [P, N, T])."""
    graph = graph_of(model)
    w_out = head_out_weights(model)
    shape = (pairs.n_pairs, graph.n_edges, *((pairs.seq_len,) if positions else ()))
    out = torch.zeros(shape, dtype=model.dtype)
    batch = batch_size or _auto_batch(model, graph.n_senders + graph.n_receivers, pairs.seq_len, memory_gb)
    with progress_bar(pairs.n_pairs, "edge attribution", progress, unit="pair") as bar:
        for start in range(0, pairs.n_pairs, batch):
            index = torch.arange(start, min(start + batch, pairs.n_pairs))
            if qk_fix or grad_drop:
                value = edge_atp(model, graph, pairs, index, direction, w_out, cost, qk_fix, grad_drop, positions)
            else:
                value = eap(model, graph, pairs, index, direction, w_out, cost, positions, ig_steps)
            out[index] = value.detach().to(out.dtype).cpu()
            bar.update(len(index))
    return out, {}


def _auto_batch(model: Model, n_vectors: int, seq_len: int, memory_gb: float) -> int:
    """Pairs per batch: sender/receiver vectors [S + R, T, D] plus an autograd graph, per pair."""
    item = torch.finfo(model.dtype).bits // 8
    per_pair = (n_vectors * seq_len * model.d_model + 8 * model.n_layers * edge_bytes(model, seq_len) // item) * item
    return max(1, int(memory_gb * 2**30 // per_pair))


def _load(path: str | None, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    effects = torch.zeros(shape, dtype=dtype)
    done = torch.zeros(shape, dtype=torch.bool)
    if path and Path(path).exists():
        saved = load_file(path)
        if "key" not in saved or bytes(saved["key"].tolist()).decode() != key:
            raise InputError(
                f"checkpoint {path} belongs to another model, prompt set or direction; delete it or choose another path"
            )
        effects, done = saved["effects"].to(dtype), saved["done"].bool()
    return effects, done


def _save(path: str, key: str, effects: torch.Tensor, done: torch.Tensor) -> None:
    tensors = {
        "effects": effects.contiguous(),
        "done": done.to(torch.uint8).contiguous(),
        "key": torch.tensor(list(key.encode()), dtype=torch.uint8),
    }
    tmp = f"{path}.tmp"
    save_file(tensors, tmp)
    Path(tmp).replace(path)
