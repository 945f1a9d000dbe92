"""Exact activation patching: I(n) = L(M(x_base | do(n <- n(x_source)))) - L(M(x_base)) for every node.

Spec §1, §7 ("Iterative"). Cost: 2P full forwards, then per node and pair one forward started at the
node's layer, counted (L - l) / L.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..cost import Cost
from ..engine import PatchCache, element_bytes, patch_single_nodes, prepare
from ..errors import InputError
from ..model import Model
from ..nodes import node_shape
from ..pairs import PromptPairs
from ..progress import progress_bar
from .base import Method, register


@register("activation_patching")
class ActivationPatching(Method):
    """The ground truth: patch every node on its own.

    Args:
        batch_size: patched forwards per batch; None picks it from ``memory_gb``.
        memory_gb: memory budget for one batch of patched forwards.
        checkpoint: a file path; partial results are saved there as they complete (and on
            interrupt), and a rerun with the same path, model and pairs resumes from them.
    """

    exact = True
    aggregation = "mean"

    def __init__(self, *, batch_size: int | None = None, memory_gb: float = 1.0, checkpoint: str | None = None) -> None:
        self.batch_size = batch_size
        self.memory_gb = memory_gb
        self.checkpoint = checkpoint

    def _validate(self, model: Model, pairs: PromptPairs, node_types: list[str]) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1 or None; got {self.batch_size}")
        if self.memory_gb <= 0:
            raise InputError(f"memory_gb must be positive; got {self.memory_gb}")

    def _attribute(
        self, model: Model, pairs: PromptPairs, node_types: list[str], direction: str, cost: Cost, progress: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        cache = prepare(model, pairs, direction, node_types, cost)
        batch = self.batch_size or max(1, int(self.memory_gb * 2**30 // element_bytes(model, pairs.seq_len)))
        key = f"{model.model_id}|{pairs.fingerprint()}|{direction}"
        effects, done = _load_checkpoint(self.checkpoint, key, model, pairs, node_types, cache.base_metric.dtype)
        total = sum(int((~d).sum()) for d in done.values())
        last_save = time.monotonic()
        try:
            with progress_bar(total, "activation patching", progress) as bar:
                for node_type in node_types:
                    for layer in range(model.n_layers):
                        todo = _pending(node_type, done[node_type], layer)
                        for start in range(0, todo.shape[0], batch):
                            chunk = todo[start : start + batch]
                            pair_i, unit_i, pos_i = _split(node_type, chunk)
                            effect = patch_single_nodes(model, cache, node_type, layer, pair_i, unit_i, pos_i, cost)
                            _store(node_type, effects[node_type], done[node_type], layer, pair_i, unit_i, pos_i, effect)
                            bar.update(len(chunk))
                            if self.checkpoint and time.monotonic() - last_save > 30:
                                _save_checkpoint(self.checkpoint, key, effects, done)
                                last_save = time.monotonic()
        except BaseException:
            if self.checkpoint:
                _save_checkpoint(self.checkpoint, key, effects, done)
            raise
        if self.checkpoint:
            _save_checkpoint(self.checkpoint, key, effects, done)
        return effects, {}, {"base_metric": cache.base_metric.tolist()}


def _pending(node_type: str, done: torch.Tensor, layer: int) -> torch.Tensor:
    """[N, 3] (pair, a, b) indices of unfinished nodes at ``layer``, sorted by position so batches start late."""
    remaining = torch.nonzero(~done[:, layer])  # [N, 3]: neuron (pair, pos, unit), others (pair, unit, pos)
    pos_col = 1 if node_type == "neuron" else 2
    return remaining[torch.sort(remaining[:, pos_col], stable=True).indices]


def _split(node_type: str, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if node_type == "neuron":
        return chunk[:, 0], chunk[:, 2], chunk[:, 1]
    return chunk[:, 0], chunk[:, 1], chunk[:, 2]


def _store(node_type: str, effects: torch.Tensor, done: torch.Tensor, layer: int, pair_i: torch.Tensor,
           unit_i: torch.Tensor, pos_i: torch.Tensor, effect: torch.Tensor) -> None:
    layer_i = torch.full_like(pair_i, layer)
    index = (pair_i, layer_i, pos_i, unit_i) if node_type == "neuron" else (pair_i, layer_i, unit_i, pos_i)
    effects[index] = effect.to(effects.dtype).cpu()
    done[index] = True


def _load_checkpoint(path: str | None, key: str, model: Model, pairs: PromptPairs, node_types: list[str],
                     dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    effects = {t: torch.zeros(pairs.n_pairs, *node_shape(t, model.sizes, pairs.seq_len), dtype=dtype) for t in node_types}
    done = {t: torch.zeros(e.shape, dtype=torch.bool) for t, e in effects.items()}
    if path and Path(path).exists():
        saved = load_file(path)
        if saved.get("key") is None or bytes(saved["key"].tolist()).decode() != key:
            raise InputError(
                f"checkpoint {path} belongs to another model, prompt set or direction; delete it or choose another path"
            )
        for t in node_types:
            if f"effects/{t}" in saved and saved[f"effects/{t}"].shape == effects[t].shape:
                effects[t] = saved[f"effects/{t}"].to(dtype)
                done[t] = saved[f"done/{t}"].bool()
    return effects, done


def _save_checkpoint(path: str, key: str, effects: dict[str, torch.Tensor], done: dict[str, torch.Tensor]) -> None:
    tensors = {f"effects/{t}": e.contiguous() for t, e in effects.items()}
    tensors.update({f"done/{t}": d.to(torch.uint8).contiguous() for t, d in done.items()})
    tensors["key"] = torch.tensor(list(key.encode()), dtype=torch.uint8)
    tmp = f"{path}.tmp"
    save_file(tensors, tmp)
    Path(tmp).replace(path)
