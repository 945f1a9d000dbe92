"""Exact activation patching: I(n) = L(M(x_base | do(n <- n(x_source)))) - L(M(x_base)) for every node.

Spec §1, §7 ("Iterative"). Cost: 2P full forwards, then per node and pair one forward started at the
node's layer, counted (L - l) / L.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..cost import Cost
from ..engine import MIN_CHUNK_TOKENS
from ..errors import InputError
from ..memory import layout_elems
from ..model import Model
from ..pairs import PromptPairs
from ..spaces import BUILTIN_TYPES, space_class, spaces_for
from ..validate import check_batch_size, check_count, check_memory_gb
from .base import check_edge_positions, register
from .patched import PatchedForwards


@register(
    "activation_patching",
    summary="exact: patch every node alone, one forward per node and pair (the ground truth)",
)
class ActivationPatching(PatchedForwards):
    """The ground truth: patch every node on its own.

    Args:
        batch_size: patched forwards per batch; None picks it from ``memory_gb``.
        memory_gb: bound on the run's memory besides the weights (cached activations, results, one batch;
            ``info["memory"]`` holds the prediction).
        checkpoint: a folder holding one file per finished work unit (pair block x layer; edges in its
            ``edges`` subfolder), in-process or on workers; a rerun with the same folder, model, pairs and
            options resumes from them (another computation's folder is refused, naming what differs).
        min_chunk_tokens: a batch may end at a change of patched position once it holds this many
            token-rows; smaller batches start later (less compute), larger ones use the hardware better.
        layers: patch only the nodes of these layers (None: all). Nodes of other layers are not
            patched: their ``per_pair`` is 0 and ``info["layers"]`` lists the layers that were.
        edge_positions: position-resolved edges, ``per_pair["edge"]`` [P, N, T]: each edge patched at one
            sender position at a time (N x T forwards per pair; ``check_edge_positions``).
        edge_convention: head senders on a post-norm model, ``"atpstar"`` or ``"mib"`` (as for ``atp``).
    """

    exact = True
    aggregation = "mean"
    node_types = BUILTIN_TYPES  # edges: exact edge patching (``atpstar.edges.patching``)
    engines = ("sites", "edges", "latents")
    distributable = True

    batch_size: int | None = None
    memory_gb: float = 1.0
    checkpoint: str | None = None
    min_chunk_tokens: int = MIN_CHUNK_TOKENS
    layers: list[int] | None = None
    edge_positions: bool = False
    edge_convention: str = "atpstar"

    def expected_cost(self, model: Model, pairs: PromptPairs, node_types: list[str], info: Mapping[str, Any]) -> Cost:
        """2P full forwards per node space, then one forward per node and pair, counted (L - l) / L (the
        node's ``patch_share``; an edge's from its receiver's layer)."""
        cost = Cost()
        for space in spaces_for(model, node_types, self.get_options()):
            cost.add_forward(2 * pairs.n_pairs)
            for t in space.node_types:
                share = space.patch_share(t, pairs.seq_len)  # [*layout]
                if self.layers is not None:
                    share = share[sorted(set(self.layers))]  # layouts start with the layer axis
                cost.forward += pairs.n_pairs * float(share.sum())
        return cost

    def _validate(self, model: Model, pairs: PromptPairs, node_types: list[str]) -> None:
        self.layers = None if self.layers is None else list(self.layers)
        not_sites = [t for t in node_types if space_class(t).engine != "sites"]
        if self.layers is not None and not_sites:
            raise InputError(f"layers= restricts site-node patching only; ask for {not_sites} in a call without it")
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

    def _sizes(self, model: Model, n_pairs: int, seq_len: int, node_types: list[str]) -> dict[str, Any]:
        n_layers = len(self.layers) if self.layers is not None else model.n_layers
        nodes = layout_elems(model, node_types, seq_len)
        item = torch.finfo(model.dtype).bits // 8
        return {
            "n_items": n_pairs * nodes * n_layers // model.n_layers,
            "run_bytes": 0,
            "item_extra": 0,
            "results_bytes": n_pairs * nodes * (item + 1),  # effects and the done mask
            "pair_blocks": True,
        }

    def _batch(self, model: Model, pairs: PromptPairs, node_types: list[str]) -> int:
        return self.memory_plan(model, pairs.n_pairs, pairs.seq_len, node_types).batch

    def _attribute_edges(
        self, model: Model, pairs: PromptPairs, direction: str, cost: Cost, progress: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        from ..distributed import LocalExecutor
        from ..distributed.sweeps import edges_on

        checkpoint = str(Path(self.checkpoint) / "edges") if self.checkpoint else None
        options: dict[str, Any] = {"batch_size": self.batch_size, "memory_gb": self.memory_gb}
        options.update(positions=self.edge_positions, convention=self.edge_convention)
        effects, base_metric, info = edges_on(
            LocalExecutor(model, progress), model, pairs, direction, options, checkpoint, cost, self.get_options()
        )
        resumed = {"edge_resumed_from": info["resumed_from"]} if "resumed_from" in info else {}
        return effects, {}, {"edge_base_metric": base_metric.tolist(), **resumed}

    def _attribute_latents(self, job: Any, space: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Every latent and error node patched alone (``NodeSpace.exact_effects``), in layout order."""
        shapes = {t: space.shape(t, job.seq_len) for t in space.node_types}
        nodes = [(t, tuple(index)) for t, shape in shapes.items() for index in itertools.product(*map(range, shape))]
        batch = self.batch_size or max(1, int(self.memory_gb * 2**30) // space.element_bytes(job))
        effects, base_metric = space.exact_effects(job, nodes, batch)  # [N, P]
        per_pair, start = {}, 0
        for t, shape in shapes.items():
            count = int(torch.Size(shape).numel())
            per_pair[t] = effects[start : start + count].T.reshape(job.n_pairs, *shape)  # [N_t, P] -> [P, *layout]
            start += count
        return per_pair, {"base_metric": base_metric.tolist()}

    def _attribute_on(
        self, executor: Any, model: Model, pairs: PromptPairs, node_types: list[str], direction: str, cost: Cost
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        return self._sweep(executor, model, pairs, node_types, direction, cost, None)

    def _attribute(
        self, model: Model, pairs: PromptPairs, node_types: list[str], direction: str, cost: Cost, progress: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        from ..distributed import LocalExecutor

        plan = self.memory_plan(model, pairs.n_pairs, pairs.seq_len, node_types)
        block = plan.pair_block or pairs.n_pairs  # pairs stream through in blocks: one block's cache at a time
        executor = LocalExecutor(model, progress, one_block=True)
        return self._sweep(executor, model, pairs, node_types, direction, cost, block)

    def _sweep(
        self,
        executor: Any,
        model: Model,
        pairs: PromptPairs,
        node_types: list[str],
        direction: str,
        cost: Cost,
        block: int | None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        """The sweep as (pair block x layer) units on ``executor`` (``block``: pairs per unit; None: split for workers)."""
        from ..distributed.sweeps import patch_on

        layers = sorted(set(self.layers)) if self.layers is not None else list(range(model.n_layers))
        options = {"batch": self._batch(model, pairs, node_types), "min_chunk_tokens": self.min_chunk_tokens}
        effects, base_metric, info = patch_on(
            executor, model, pairs, node_types, direction, layers, options, self.checkpoint, cost, block,
            self.get_options(),
        )  # fmt: skip
        if block is not None and block < pairs.n_pairs:
            info["pair_block"] = block
        return effects, {}, {"base_metric": base_metric.tolist(), "layers": layers, **info}
