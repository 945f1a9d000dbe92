"""Work units: pieces of one sweep that run on any worker and merge back to the in-process result.

A ``Sweep`` holds what every unit of a sweep shares (pairs, direction, node types, batching); a unit
names its share: exact patching by (pair block x layers) of nodes or edges, verification by a window of ranks,
Subsampling and the bound by a range of (sample, pair) elements whose Welford statistics merge,
Blocks and Hierarchical by a list of blocks, any method whose pairs do not interact by a block of
pairs (the method's own call on those pairs). ``WorkerState`` runs units next to a loaded model and
keeps the base/source runs (``engine.prepare``) of the sweep it is working on, so a worker prepares
each pair block once however many of its units it runs.

Memory: every unit's batch comes from ``batching.plan_batch``, sized by what one batch element takes:
``footprint`` on the unit kinds that declare it (edges, samples), the method's memory plan for exact
patching and whole-method pair blocks, ``NodeSpace.element_bytes`` for verification,
``sweeps.blocks.block_footprint`` per (node type, layer) for blocks.

Shape letters: P pairs (of the unit's pair block), N nodes of the unit, L layers of the unit.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..batching import Footprint
from ..cost import Cost
from ..edges.circuit_run import circuit_bytes
from ..edges.graph import graph_of
from ..edges.patching import edge_bytes
from ..engine import patch_listed, prepare
from ..model import Model
from ..nodes import node_shape
from ..pairs import PromptPairs
from ..sweeps.blocks import Block, patch_blocks
from ..sweeps.edges import patch_edge_layer, sample_edge_range
from ..sweeps.patching import patch_layers
from ..sweeps.subsampling import subsample_range


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
        prepare: runs the base and source runs of a pair block (edges: their own); None: ``engine.prepare``
            in chunks of ``options["batch"]`` (within the memory of one batch of patched forwards).
    """

    kind: str
    pairs: PromptPairs
    direction: str
    node_types: list[str]
    options: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    prepare: Callable[[Model, PromptPairs, str, list[str], Cost], Any] | None = None

    def prepared(self, model: Model, pairs: PromptPairs, cost: Cost) -> Any:
        """The base and source runs of ``pairs`` (all of the sweep's pairs or a block of them)."""
        if self.prepare is not None:
            return self.prepare(model, pairs, self.direction, self.node_types, cost)
        return prepare(model, pairs, self.direction, self.node_types, cost, chunk=self.options.get("batch"))


@dataclass
class UnitResult:
    """What a unit sends back.

    Attributes:
        tensors: the unit's numbers (layout per unit kind), always with ``base_metric`` [P].
        cost: passes the unit itself ran.
        prepare: base/source forwards its worker ran for it (zero when they were cached).
        meta: facts besides the tensors (JSON-able; a pair block's ``info``).
    """

    tensors: dict[str, torch.Tensor]
    cost: Cost
    prepare: Cost
    meta: dict[str, Any] = field(default_factory=dict)


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
        def compute(cache: Any, cost: Cost) -> dict[str, torch.Tensor]:
            o = sweep.options
            layers = list(self.layers)
            return patch_layers(worker.model, cache, sweep.node_types, layers, o["batch"], cost, o["min_chunk_tokens"])

        return worker.compute(sweep, self.pair_start, self.pair_stop, compute)  # type -> [P, L_unit, ...]


@dataclass(frozen=True)
class EdgeUnit:
    """Exact patching of every edge read at ``layer`` (L: the logits) on pairs ``pair_start``..``pair_stop``-1."""

    pair_start: int
    pair_stop: int
    layer: int
    work: int = field(default=0, compare=False)
    weight: float = field(default=0.0, compare=False)

    @property
    def name(self) -> str:
        return f"edges_pairs{self.pair_start}-{self.pair_stop}_layer{self.layer}"

    @staticmethod
    def footprint(model: Model, pairs: PromptPairs) -> Footprint:
        """One element: a forward with one patched edge."""
        return Footprint(edge_bytes(model, pairs.seq_len))

    def run(self, worker: WorkerState, sweep: Sweep) -> UnitResult:
        def compute(cache: Any, cost: Cost) -> dict[str, torch.Tensor]:
            o = sweep.options
            return {"edge": patch_edge_layer(worker.model, cache, self.layer, o["batch"], o["positions"], cost)}

        return worker.compute(sweep, self.pair_start, self.pair_stop, compute)  # edge: [P, N_layer(, T)]


# The per-node tensors of a verification sweep (``Sweep.tensors``), each [N] in rank order.
RANKED = ("type", "layer", "unit", "pos")


@dataclass(frozen=True)
class RangeUnit:
    """A unit that is a range ``start``..``stop``-1 of its sweep's items (ranks, elements, pairs)."""

    start: int
    stop: int
    work: int = field(default=0, compare=False)  # items, for the progress bar
    weight: float = field(default=0.0, compare=False)  # expected cost, to start big units first
    prefix: ClassVar[str] = "range"  # the unit file's name: prefix, then the range

    @property
    def name(self) -> str:
        return f"{self.prefix}{self.start}-{self.stop}"


@dataclass(frozen=True)
class RankUnit(RangeUnit):
    """Verification of the nodes ranked ``start``..``stop``-1 by the estimate, on every pair."""

    prefix: ClassVar[str] = "ranks"

    def run(self, worker: WorkerState, sweep: Sweep) -> UnitResult:
        def compute(cache: Any, cost: Cost) -> dict[str, torch.Tensor]:
            type_i, layer_i, unit_i, pos_i = (sweep.tensors[k][self.start : self.stop] for k in RANKED)  # [N] each
            ranked = (type_i, layer_i, unit_i, pos_i)
            return {
                "effects": patch_listed(worker.model, cache, sweep.node_types, ranked, sweep.options["batch"], cost)
            }

        return worker.compute(sweep, 0, sweep.pairs.n_pairs, compute)  # effects: [N, P]


@dataclass(frozen=True)
class SampleUnit(RangeUnit):
    """Subsampling elements ``start``..``stop``-1 (element = sample x n_pairs + pair), all nodes."""

    prefix: ClassVar[str] = "samples"

    def run(self, worker: WorkerState, sweep: Sweep) -> UnitResult:
        def compute(cache: Any, cost: Cost) -> dict[str, torch.Tensor]:
            sampling = {k: sweep.options[k] for k in ("samples", "p", "seed", "design", "batch")}
            keep, offset = sweep.tensors.get("keep"), sweep.options.get("pair_offset", 0)
            return subsample_range(
                worker.model, cache, sweep.node_types, self.start, self.stop, keep=keep, cost=cost, pair_offset=offset,
                **sampling,
            )  # fmt: skip

        return worker.compute(sweep, 0, sweep.pairs.n_pairs, compute)  # statistic -> [P, N]


@dataclass(frozen=True)
class EdgeSampleUnit(SampleUnit):
    """Random joint patches of edge subsets, elements ``start``..``stop``-1 (``sweeps.edges``)."""

    prefix: ClassVar[str] = "edge_samples"

    @staticmethod
    def footprint(model: Model, pairs: PromptPairs) -> Footprint:
        """One element: a forward of the graph with a random set of edges patched."""
        return Footprint(circuit_bytes(model, graph_of(model), pairs.seq_len))

    def run(self, worker: WorkerState, sweep: Sweep) -> UnitResult:
        def compute(cache: Any, cost: Cost) -> dict[str, torch.Tensor]:
            o, keep = sweep.options, sweep.tensors["keep"]
            return sample_edge_range(
                worker.model, cache, self.start, self.stop, p=o["p"], seed=o["seed"], batch=o["batch"], keep=keep,
                cost=cost,
            )  # fmt: skip

        return worker.compute(sweep, 0, sweep.pairs.n_pairs, compute)  # statistic -> [P, N]


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
        def compute(cache: Any, cost: Cost) -> dict[str, torch.Tensor]:
            shapes = {t: node_shape(t, worker.model.sizes, sweep.pairs.seq_len) for t in sweep.node_types}
            blocks = [Block(*b) for b in self.blocks]
            o = sweep.options
            return {"effects": patch_blocks(worker.model, cache, blocks, shapes, o["batches"], cost)}

        return worker.compute(sweep, 0, sweep.pairs.n_pairs, compute)  # effects: [B, P]


@dataclass(frozen=True)
class PairBlockUnit(RangeUnit):
    """A whole call of ``Sweep.options["method"]`` (a method whose pairs do not interact) on pairs
    ``start``..``stop``-1; the parts merge with ``Attribution.concat``."""

    prefix: ClassVar[str] = "pairs"

    def run(self, worker: WorkerState, sweep: Sweep) -> UnitResult:
        pairs = sweep.pairs.subset(list(range(self.start, self.stop)))
        part = sweep.options["method"].attribute(worker.model, pairs, sweep.node_types, direction=sweep.direction)
        tensors = {f"per_pair/{t}": v for t, v in part.per_pair.items()}  # [P_block, *layout]
        tensors.update({f"extras/{k}": v for k, v in part.extras.items()})  # [P_block, ...]
        return UnitResult(tensors, part.cost, Cost(), {"info": part.info})


Unit = PatchUnit | EdgeUnit | RankUnit | SampleUnit | EdgeSampleUnit | BlockUnit | PairBlockUnit


class WorkerState:
    """A loaded model and the base/source runs of the sweep it works on (one sweep at a time).

    Args:
        model: the loaded model.
        one_block: keep one pair block's runs at a time (in-process: units come block by block, and
            only one block's cached activations fit the memory plan); else every block of the sweep.
    """

    def __init__(self, model: Model, one_block: bool = False) -> None:
        self.model = model
        self.one_block = one_block
        self._caches: dict[tuple[str, int, int], Any] = {}

    def cache(self, sweep: Sweep, pair_start: int, pair_stop: int) -> tuple[Any, Cost]:
        """The prepared base/source runs of a pair block (``sweep.prepare``), and the passes preparing them took now."""
        key = (sweep.id, pair_start, pair_stop)
        if key in self._caches:
            return self._caches[key], Cost()
        self._caches = {k: v for k, v in self._caches.items() if k[0] == sweep.id and not self.one_block}
        whole = (pair_start, pair_stop) == (0, sweep.pairs.n_pairs)
        pairs = sweep.pairs if whole else sweep.pairs.subset(list(range(pair_start, pair_stop)))
        cost = Cost()
        self._caches[key] = sweep.prepared(self.model, pairs, cost)
        return self._caches[key], cost

    def compute(
        self, sweep: Sweep, pair_start: int, pair_stop: int, compute: Callable[[Any, Cost], dict[str, torch.Tensor]]
    ) -> UnitResult:
        """``compute(cache, cost)`` on a pair block's prepared runs, with its base metric [P] and costs."""
        cache, prepared = self.cache(sweep, pair_start, pair_stop)
        cost = Cost()
        tensors = compute(cache, cost)
        return UnitResult({**tensors, "base_metric": cache.base_metric.cpu()}, cost, prepared)

    def run(self, sweep: Sweep, unit: Unit) -> UnitResult:
        return unit.run(self, sweep)
