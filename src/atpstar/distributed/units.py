"""Work units: pieces of one sweep that run on any worker and merge back to the in-process result.

A ``Sweep`` holds what every unit of a sweep shares (pairs, direction, node types, batching); a unit
names its share: exact patching by (pair block x layers), verification by a window of ranks,
Subsampling and the bound by a range of (sample, pair) elements whose Welford statistics merge,
Blocks and Hierarchical by a list of blocks. ``WorkerState`` runs units next to a loaded model and
keeps the base/source runs (``engine.prepare``) of the sweep it is working on, so a worker prepares
each pair block once however many of its units it runs.

Shape letters: P pairs (of the unit's pair block), N nodes of the unit, L layers of the unit.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from ..cost import Cost
from ..engine import PatchCache, prepare
from ..model import Model
from ..nodes import node_shape
from ..pairs import PromptPairs


@dataclass
class Sweep:
    """What all units of one sweep share (sent to each worker with every unit; small).

    Attributes:
        kind: ``"patch"``, ``"verify"``, ``"samples"`` or ``"blocks"``.
        pairs: the prompt pairs.
        direction: ``"noising"`` or ``"denoising"``.
        node_types: the node types the base/source runs record.
        options: batching and sampling options every unit uses (``batch``, ``samples``, ``p``, ...).
        tensors: per-sweep tensors (ranked nodes of a verification, nodes the bound keeps).
        id: identifies the sweep's cached base/source runs on workers.
    """

    kind: str
    pairs: PromptPairs
    direction: str
    node_types: list[str]
    options: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class UnitResult:
    """What a unit sends back.

    Attributes:
        tensors: the unit's numbers (layout per unit kind), always with ``base_metric`` [P].
        cost: passes the unit itself ran.
        prepare: base/source forwards its worker ran for it (zero when they were cached).
    """

    tensors: dict[str, torch.Tensor]
    cost: Cost
    prepare: Cost


@dataclass(frozen=True)
class PatchUnit:
    """Exact patching of every node of ``layers`` on pairs ``pair_start``..``pair_stop``-1."""

    pair_start: int
    pair_stop: int
    layers: tuple[int, ...]
    work: int = field(default=0, compare=False)  # patched forwards, for the progress bar
    weight: float = field(default=0.0, compare=False)  # expected cost, to start big units first

    @property
    def name(self) -> str:
        return f"patch_pairs{self.pair_start}-{self.pair_stop}_layers{'-'.join(map(str, self.layers))}"

    def run(self, worker: WorkerState, sweep: Sweep) -> UnitResult:
        from ..sweeps.patching import patch_layers

        cache, prepared = worker.cache(sweep, self.pair_start, self.pair_stop)
        cost = Cost()
        effects = patch_layers(
            worker.model,
            cache,
            sweep.node_types,
            list(self.layers),
            sweep.options["batch"],
            cost,
            sweep.options["min_chunk_tokens"],
        )
        return UnitResult({**effects, "base_metric": cache.base_metric.cpu()}, cost, prepared)


@dataclass(frozen=True)
class RankUnit:
    """Verification of the nodes ranked ``start``..``stop``-1 by the estimate, on every pair."""

    start: int
    stop: int
    work: int = field(default=0, compare=False)
    weight: float = field(default=0.0, compare=False)

    @property
    def name(self) -> str:
        return f"ranks{self.start}-{self.stop}"

    def run(self, worker: WorkerState, sweep: Sweep) -> UnitResult:
        from ..sweeps.patching import patch_ranked

        cache, prepared = worker.cache(sweep, 0, sweep.pairs.n_pairs)
        window = {k: v[self.start : self.stop] for k, v in sweep.tensors.items()}
        cost = Cost()
        effects = patch_ranked(
            worker.model,
            cache,
            sweep.node_types,
            (window["type"], window["layer"], window["unit"], window["pos"]),
            sweep.options["batch"],
            cost,
        )  # [N, P]
        return UnitResult({"effects": effects, "base_metric": cache.base_metric.cpu()}, cost, prepared)


@dataclass(frozen=True)
class SampleUnit:
    """Subsampling elements ``start``..``stop``-1 (element = sample x n_pairs + pair), all nodes."""

    start: int
    stop: int
    work: int = field(default=0, compare=False)
    weight: float = field(default=0.0, compare=False)

    @property
    def name(self) -> str:
        return f"samples{self.start}-{self.stop}"

    def run(self, worker: WorkerState, sweep: Sweep) -> UnitResult:
        from ..sweeps.subsampling import subsample_range

        cache, prepared = worker.cache(sweep, 0, sweep.pairs.n_pairs)
        cost = Cost()
        o = sweep.options
        values = subsample_range(
            worker.model,
            cache,
            sweep.node_types,
            self.start,
            self.stop,
            samples=o["samples"],
            p=o["p"],
            seed=o["seed"],
            design=o["design"],
            batch=o["batch"],
            keep=sweep.tensors.get("keep"),
            cost=cost,
        )  # statistic -> [P, N]
        return UnitResult({**values, "base_metric": cache.base_metric.cpu()}, cost, prepared)


@dataclass(frozen=True)
class BlockUnit:
    """Joint patching of each of ``blocks`` (``sweeps.blocks.Block`` tuples) on every pair."""

    blocks: tuple[tuple[str, int, int, int], ...]
    work: int = field(default=0, compare=False)
    weight: float = field(default=0.0, compare=False)

    @property
    def name(self) -> str:
        digest = hashlib.sha256(repr(self.blocks).encode()).hexdigest()[:20]
        return f"blocks{len(self.blocks)}_{digest}"

    def run(self, worker: WorkerState, sweep: Sweep) -> UnitResult:
        from ..sweeps.blocks import Block, patch_blocks

        cache, prepared = worker.cache(sweep, 0, sweep.pairs.n_pairs)
        shapes = {t: node_shape(t, worker.model.sizes, sweep.pairs.seq_len) for t in sweep.node_types}
        cost = Cost()
        blocks = [Block(*b) for b in self.blocks]
        o = sweep.options
        effects = patch_blocks(worker.model, cache, blocks, shapes, o["batch_size"], o["memory_gb"], cost)
        return UnitResult({"effects": effects, "base_metric": cache.base_metric.cpu()}, cost, prepared)


Unit = PatchUnit | RankUnit | SampleUnit | BlockUnit


class WorkerState:
    """A loaded model and the base/source runs of the sweep it works on (one sweep at a time)."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self._caches: dict[tuple[str, int, int], PatchCache] = {}

    def cache(self, sweep: Sweep, pair_start: int, pair_stop: int) -> tuple[PatchCache, Cost]:
        """The prepared base/source runs of a pair block, and the passes preparing them took now."""
        key = (sweep.id, pair_start, pair_stop)
        if key in self._caches:
            return self._caches[key], Cost()
        self._caches = {k: v for k, v in self._caches.items() if k[0] == sweep.id}  # free finished sweeps
        whole = (pair_start, pair_stop) == (0, sweep.pairs.n_pairs)
        pairs = sweep.pairs if whole else sweep.pairs.subset(list(range(pair_start, pair_stop)))
        cost = Cost()
        self._caches[key] = prepare(self.model, pairs, sweep.direction, sweep.node_types, cost)
        return self._caches[key], cost

    def run(self, sweep: Sweep, unit: Unit) -> UnitResult:
        return unit.run(self, sweep)
