"""Exact activation patching: I(n) = L(M(x_base | do(n <- n(x_source)))) - L(M(x_base)) for every node.

Spec §1, §7 ("Iterative"). Cost: 2P full forwards, then per node and pair one forward started at the
node's layer, counted (L - l) / L.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..checkpoint import CheckpointSchedule, load_checkpoint, save_checkpoint
from ..cost import Cost
from ..engine import MIN_CHUNK_TOKENS, prepare, sweep_layer
from ..errors import InputError
from ..fingerprint import identity
from ..memory import MemoryPlan, layout_elems, patching_plan
from ..model import Model
from ..nodes import ALL_TYPES, node_shape
from ..ops import accumulation_dtype
from ..pairs import PromptPairs
from ..progress import progress_bar
from ..sweeps.patching import pending_nodes, store_effects
from ..validate import check_batch_size, check_count, check_memory_gb
from .base import Method, check_edge_positions, register


@register(
    "activation_patching",
    summary="exact: patch every node alone, one forward per node and pair (the ground truth)",
)
class ActivationPatching(Method):
    """The ground truth: patch every node on its own.

    Args:
        batch_size: patched forwards per batch; None picks it from ``memory_gb``.
        memory_gb: bound on the run's memory besides the weights (cached activations, results, one batch;
            ``info["memory"]`` holds the prediction).
        checkpoint: a file path; partial results are saved there as they complete (and on
            interrupt), and a rerun with the same path, model and pairs resumes from them. With
            ``workers=``, a folder holding one file per finished work unit (pair block x layer).
        min_chunk_tokens: a batch may end at a change of patched position once it holds this many
            token-rows; smaller batches start later (less compute), larger ones use the hardware better.
        layers: patch only the nodes of these layers (None: all). Nodes of other layers are not
            patched: their ``per_pair`` is 0 and ``info["layers"]`` lists the layers that were.
        edge_positions: position-resolved edges, ``per_pair["edge"]`` [P, N, T]: each edge patched at one
            sender position at a time (N x T forwards per pair; ``check_edge_positions``).
    """

    exact = True
    aggregation = "mean"
    node_types = ALL_TYPES  # edges: exact edge patching (``atpstar.edges.patching``)
    distributable = True

    def __init__(
        self,
        *,
        batch_size: int | None = None,
        memory_gb: float = 1.0,
        checkpoint: str | None = None,
        min_chunk_tokens: int = MIN_CHUNK_TOKENS,
        layers: list[int] | None = None,
        edge_positions: bool = False,
    ) -> None:
        self.batch_size = batch_size
        self.memory_gb = memory_gb
        self.checkpoint = checkpoint
        self.min_chunk_tokens = min_chunk_tokens
        self.layers = None if layers is None else list(layers)
        self.edge_positions = edge_positions

    def expected_cost(self, model: Model, pairs: PromptPairs, node_types: list[str], info: Mapping[str, Any]) -> Cost:
        """2P full forwards, then one forward per node and pair of the patched layers, counted (L - l) / L."""
        cost = Cost()
        cost.add_forward(2 * pairs.n_pairs)
        layers = sorted(set(self.layers)) if self.layers is not None else range(model.n_layers)
        for t in node_types:
            per_layer = math.prod(node_shape(t, model.sizes, pairs.seq_len)[1:])
            for layer in layers:
                cost.add_forward(pairs.n_pairs * per_layer, start_layer=layer, n_layers=model.n_layers)
        return cost

    def _validate(self, model: Model, pairs: PromptPairs, node_types: list[str]) -> None:
        if self.layers is not None and "edge" in node_types:
            raise InputError("layers= restricts node patching only; ask for edges in a call without it")
        check_edge_positions(self.edge_positions, node_types)
        check_batch_size(self.batch_size)
        check_memory_gb(self.memory_gb)
        check_count("min_chunk_tokens", self.min_chunk_tokens)
        if self.layers is not None and (
            not self.layers or any(not isinstance(i, int) or not 0 <= i < model.n_layers for i in self.layers)
        ):
            raise InputError(
                f"layers must be a non-empty list of layer indices in [0, {model.n_layers}); got {self.layers}"
            )

    def memory_plan(self, model: Model, n_pairs: int, seq_len: int, node_types: list[str]) -> MemoryPlan:
        n_layers = len(self.layers) if self.layers is not None else model.n_layers
        nodes = layout_elems(model, node_types, seq_len)
        item = torch.finfo(model.dtype).bits // 8
        return patching_plan(
            model,
            self.id,
            n_pairs,
            seq_len,
            node_types,
            n_items=n_pairs * nodes * n_layers // model.n_layers,
            run_bytes=0,
            item_extra=0,
            batch_size=self.batch_size,
            memory_gb=self.memory_gb,
            results_bytes=n_pairs * nodes * (item + 1),  # effects and the done mask
            pair_blocks=True,
        )

    def _batch(self, model: Model, pairs: PromptPairs, node_types: list[str]) -> int:
        return self.memory_plan(model, pairs.n_pairs, pairs.seq_len, node_types).batch

    def _attribute_edges(
        self, model: Model, pairs: PromptPairs, direction: str, cost: Cost, progress: bool
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        from ..edges.sweep import exact_edges

        checkpoint = f"{self.checkpoint}.edges" if self.checkpoint else None
        effects, info = exact_edges(
            model,
            pairs,
            direction,
            cost,
            progress,
            self.batch_size,
            self.memory_gb,
            checkpoint,
            self.edge_positions,
            identity(model, pairs, direction, ["edge"], self.id, self.get_options()),
        )
        resumed = {"edge_resumed_from": info["resumed_from"]} if "resumed_from" in info else {}
        return effects, {"edge_base_metric": info["base_metric"], **resumed}

    def _attribute_on(
        self, executor: Any, model: Model, pairs: PromptPairs, node_types: list[str], direction: str, cost: Cost
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        from ..distributed.sweeps import patch_on

        layers = sorted(set(self.layers)) if self.layers is not None else list(range(model.n_layers))
        options = {"batch": self._batch(model, pairs, node_types), "min_chunk_tokens": self.min_chunk_tokens}
        effects, base_metric, info = patch_on(
            executor, model, pairs, node_types, direction, layers, options, self.checkpoint, cost
        )
        return effects, {}, {"base_metric": base_metric.tolist(), "layers": layers, **info}

    def _attribute(
        self, model: Model, pairs: PromptPairs, node_types: list[str], direction: str, cost: Cost, progress: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        plan = self.memory_plan(model, pairs.n_pairs, pairs.seq_len, node_types)
        batch, block = plan.batch, plan.pair_block or pairs.n_pairs
        made_by = identity(model, pairs, direction, node_types, self.id, self.get_options())
        dtype = accumulation_dtype(model.dtype)  # the metric's dtype (logits are upcast for half models)
        effects, done, prior = _resume(self.checkpoint, made_by, model, pairs, node_types, dtype)
        prepared = Cost()  # base and source runs: paid again on every resume
        base_metric = torch.zeros(pairs.n_pairs, dtype=dtype)

        def save() -> None:
            if self.checkpoint:  # the saved part's cost: earlier runs' plus this run's patching
                spent = prior + Cost(cost.forward - prepared.forward, cost.backward - prepared.backward)
                tensors = {f"effects/{t}": e for t, e in effects.items()}
                tensors.update({f"done/{t}": d.to(torch.uint8) for t, d in done.items()})
                save_checkpoint(self.checkpoint, made_by, tensors, spent)

        layers = sorted(set(self.layers)) if self.layers is not None else list(range(model.n_layers))
        total = sum(int((~d[:, layers]).sum()) for d in done.values())
        schedule, finished = CheckpointSchedule(), 0
        try:
            with progress_bar(total, "activation patching", progress) as bar:
                # Pairs stream through in blocks: only one block's cached activations exist at a time.
                for first in range(0, pairs.n_pairs, block):
                    rows = slice(first, min(first + block, pairs.n_pairs))
                    before = Cost(cost.forward, cost.backward)
                    cache = prepare(model, pairs.subset(range(rows.start, rows.stop)), direction, node_types, cost)
                    prepared = prepared + Cost(cost.forward - before.forward, cost.backward - before.backward)
                    base_metric[rows] = cache.base_metric.cpu()
                    block_effects = {t: e[rows] for t, e in effects.items()}  # views: results land in place
                    block_done = {t: d[rows] for t, d in done.items()}
                    for layer in layers:
                        pending = pending_nodes(node_types, block_done, layer)  # pair indices within the block
                        sweep = sweep_layer(
                            model, cache, layer, node_types, pending, batch, cost, self.min_chunk_tokens
                        )
                        for chunk, effect in sweep:
                            type_i, pair_i, unit_i, pos_i = (part[chunk] for part in pending)
                            elements = (type_i, pair_i, unit_i, pos_i)
                            store_effects(node_types, block_effects, block_done, layer, elements, effect)
                            bar.update(len(chunk))
                            finished += len(chunk)
                            if self.checkpoint and schedule.due(finished, total):
                                save()
                                schedule.saved(finished)
                    del cache
        except BaseException:
            save()
            raise
        save()
        cost.forward += prior.forward  # the whole computation's cost, also after resuming
        cost.backward += prior.backward
        info: dict[str, Any] = {"base_metric": base_metric.tolist(), "layers": layers}
        if block < pairs.n_pairs:
            info["pair_block"] = block
        if prior.forward_equivalents > 0:
            info["resumed_from"] = str(self.checkpoint)
        return effects, {}, info


def _resume(
    path: str | None,
    made_by: dict[str, str],
    model: Model,
    pairs: PromptPairs,
    node_types: list[str],
    dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Cost]:
    """(effects, done, cost of the saved part): from the checkpoint at ``path`` if it has one, else empty."""
    effects = {
        t: torch.zeros(pairs.n_pairs, *node_shape(t, model.sizes, pairs.seq_len), dtype=dtype) for t in node_types
    }
    done = {t: torch.zeros(e.shape, dtype=torch.bool) for t, e in effects.items()}
    saved = load_checkpoint(path, made_by)
    if saved is None:
        return effects, done, Cost()
    tensors, prior = saved
    for t in node_types:
        if f"effects/{t}" in tensors and tensors[f"effects/{t}"].shape == effects[t].shape:
            effects[t] = tensors[f"effects/{t}"].to(dtype)
            done[t] = tensors[f"done/{t}"].bool()
    return effects, done, prior
