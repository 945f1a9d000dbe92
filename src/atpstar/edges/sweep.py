"""The edge forms of the registered methods: an exact sweep over every edge (resumable) and the
gradient estimators batched over pairs. Method classes call these from ``_attribute_edges``.

Shape letters: P pairs, N edges.
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
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Exact effect [P, N] of patching every edge alone; partial results go to ``checkpoint``."""
    graph = graph_of(model)
    cache = prepare_edges(model, graph, pairs, direction, cost)
    batch = batch_size or max(1, int(memory_gb * 2**30 // edge_bytes(model, pairs.seq_len)))
    key = f"edges|{model.model_id}|{pairs.fingerprint()}|{direction}|{graph.n_edges}"
    effects, done = _load(checkpoint, key, pairs.n_pairs, graph.n_edges, cache.base_metric.dtype)
    layer_of_edge = torch.tensor([graph.receiver_layer(r) for r in graph.receiver_index.tolist()])
    last_save = time.monotonic()
    try:
        with progress_bar(int((~done).sum()), "exact edge patching", progress, unit="edge") as bar:
            for layer in range(model.n_layers + 1):
                pair_i, edge_i = torch.nonzero(~done & (layer_of_edge == layer)[None]).unbind(1)
                for start in range(0, len(pair_i), batch):
                    p, e = pair_i[start : start + batch], edge_i[start : start + batch]
                    effects[p, e] = patch_edges(model, cache, layer, p, e, cost).to(effects.dtype).cpu()
                    done[p, e] = True
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
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Edge AtP (EAP), its QK fix / GradDrop / AtP* forms, or EAP-IG: [P, N]."""
    graph = graph_of(model)
    w_out = head_out_weights(model)
    out = torch.zeros(pairs.n_pairs, graph.n_edges, dtype=model.dtype)
    batch = batch_size or _auto_batch(model, graph.n_senders + graph.n_receivers, pairs.seq_len, memory_gb)
    with progress_bar(pairs.n_pairs, "edge attribution", progress, unit="pair") as bar:
        for start in range(0, pairs.n_pairs, batch):
            index = torch.arange(start, min(start + batch, pairs.n_pairs))
            if qk_fix or grad_drop:
                value = edge_atp(model, graph, pairs, index, direction, w_out, cost, qk_fix, grad_drop)
            else:
                value = eap(model, graph, pairs, index, direction, w_out, cost, ig_steps=ig_steps)
            out[index] = value.detach().to(out.dtype).cpu()
            bar.update(len(index))
    return out, {}


def _auto_batch(model: Model, n_vectors: int, seq_len: int, memory_gb: float) -> int:
    """Pairs per batch: sender/receiver vectors [S + R, T, D] plus an autograd graph, per pair."""
    item = torch.finfo(model.dtype).bits // 8
    per_pair = (n_vectors * seq_len * model.d_model + 8 * model.n_layers * edge_bytes(model, seq_len) // item) * item
    return max(1, int(memory_gb * 2**30 // per_pair))


def _load(
    path: str | None, key: str, n_pairs: int, n_edges: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    effects = torch.zeros(n_pairs, n_edges, dtype=dtype)
    done = torch.zeros(n_pairs, n_edges, dtype=torch.bool)
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
