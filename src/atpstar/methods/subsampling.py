"""Subsampling (the paper's Algorithm 1): ĉ(n) = mean_in(n) - mean_out(n) over random jointly patched subsets.

Per pair and sample, draw a subset S of the nodes (each in with probability ``p``), patch all of S at
once and record Δ = L(patched) - L(base). Per node, online (Welford) counts, means and variances of Δ
over the samples where it was in and where it was out. Exact for additive effects with a balanced
design. Spec §7; §9 builds the false-negative bound on the same statistics (``atpstar.bound``).
Cost: 2P full forwards (base and source runs), then ``samples`` × P patched forwards, each started
at the lowest layer patched in its batch (counted (L - l) / L; with many nodes per subset, layer 0).

Shape letters: P pairs, B batch, N nodes (all requested node types, flattened).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..batching import GIB, HEADROOM, Footprint, pairs_per_block, plan_batch
from ..cost import Cost
from ..engine import PatchCache, cache_bytes
from ..errors import InputError
from ..memory import layout_elems, patched_forward_bytes
from ..model import Model
from ..nodes import NodeLayout
from ..pairs import PromptPairs
from ..progress import progress_bar
from ..sweeps.subsampling import STATS, SubsamplingStats, keep_mask, subsample_range
from ..validate import check_batching
from .base import Method, register
from .patched import PatchedForwards

DESIGNS: tuple[str, ...] = ("random", "balanced")
STATS_BYTES = 6 * 8  # per pair and node: running (count, mean, M2) in and out, float64
ELEMENT_BYTES_PER_NODE = 40  # per patched forward and node: its mask and the batch's statistics work space
EXTRAS_BYTES = 8 * 8  # per pair and node: the returned estimate and six statistics (float64)


@register(
    "subsampling",
    summary="patch random node subsets jointly; estimate = mean effect with the node in - mean without",
)
class Subsampling(PatchedForwards):
    """Subsampling: patch random node subsets jointly; ĉ(n) = mean Δ with n patched - mean Δ without.

    ``per_pair[t]`` [P, *layout] is ``mean_in - mean_out`` per pair (0 where a node was never in, or
    never out, of a sample); ``scores`` the mean of its absolute value over pairs. ``extras`` holds,
    per node type, ``count_in/<t>``, ``mean_in/<t>``, ``var_in/<t>`` (unbiased; 0 below 2 samples) and
    the same for ``out``, each [P, *layout] float64, for the Welch bound of the false-negative bound.

    Args:
        samples: subsets drawn per prompt pair (forwards per pair).
        p: probability that a node is in a subset. Larger p gives lower variance for additive effects
            (best at 0.5); smaller p keeps subsets closer to single-node patches when effects interact.
        seed: random seed. Subset (pair j, sample s) depends only on (seed, j, s), so results do not
            depend on ``batch_size``.
        design: ``"random"`` (each node in independently with probability p; Algorithm 1) or
            ``"balanced"`` (rows of a Sylvester-Hadamard matrix: node n gets a code c_n in 1..samples-1
            and is in sample s iff popcount(s & c_n) is odd, so every node is in exactly half the
            samples and any two nodes with distinct codes are in together in exactly a quarter; the
            estimate is then exact for additive effects). ``"balanced"`` needs p = 0.5 and ``samples``
            a power of two; codes are distinct (seeded permutation) when there are fewer than
            ``samples`` nodes, otherwise drawn at random, and nodes sharing a code are confounded.
            The same design is used for every pair. Its samples are not independent: do not use its
            variances for confidence intervals.
        batch_size: patched forwards per batch; None picks it from ``memory_gb``.
        memory_gb: bound on the run's memory besides the weights (cache, statistics, one batch).
    """

    seeded = True
    aggregation = "mean_abs"
    cost_is_bound = True  # each batch starts at its lowest patched layer, which the random subsets decide
    distributable = True

    samples: int = 256
    p: float = 0.5
    seed: int = 0
    design: str = "random"
    batch_size: int | None = None
    memory_gb: float = 1.0

    def expected_cost(self, model: Model, pairs: PromptPairs, node_types: list[str], info: Mapping[str, Any]) -> Cost:
        """At most 2P full forwards and ``samples`` x P patched forwards."""
        return Cost(forward=2 * pairs.n_pairs + self.samples * pairs.n_pairs)

    def _validate(self, model: Model, pairs: PromptPairs, node_types: list[str]) -> None:
        check_options(self.samples, self.p, self.design, self.batch_size, self.memory_gb)

    def _sizes(self, model: Model, n_pairs: int, seq_len: int, node_types: list[str]) -> dict[str, Any]:
        nodes = layout_elems(model, node_types, seq_len)
        return {
            "n_items": n_pairs * self.samples,
            "run_bytes": STATS_BYTES * n_pairs * nodes,  # running statistics
            "item_extra": ELEMENT_BYTES_PER_NODE * nodes,
            "results_bytes": EXTRAS_BYTES * n_pairs * nodes,
        }

    _attribute = Method._attribute_in_process  # its work units, on the in-process executor

    def _attribute_on(
        self, executor: Any, model: Model, pairs: PromptPairs, node_types: list[str], direction: str, cost: Cost
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        from ..distributed.sweeps import subsample_on

        sampling = {"samples": self.samples, "p": self.p, "seed": self.seed, "design": self.design}
        results = EXTRAS_BYTES * pairs.n_pairs * layout_elems(model, node_types, pairs.seq_len)
        block, batch = sample_plan(model, pairs, node_types, self.memory_gb, self.batch_size, results)
        stats, base_metric, info = subsample_on(
            executor, model, pairs, node_types, direction, sampling, batch, None, None, cost, block
        )
        return self._finish(model, node_types, stats, {"base_metric": base_metric.tolist(), **info})

    def _finish(
        self, model: Model, node_types: list[str], stats: SubsamplingStats, info: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        per_pair = {t: stats.estimate(t).to(model.dtype) for t in node_types}
        extras = {f"{name}/{t}": stats.get(name, t) for t in node_types for name in STATS}
        return per_pair, extras, info


def check_options(samples: Any, p: Any, design: Any, batch_size: Any, memory_gb: Any) -> None:
    """Raise ``InputError`` for bad Subsampling options (before any forward pass)."""
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 2:
        raise InputError(f"samples must be an integer >= 2; got {samples!r}")
    if not isinstance(p, (int, float)) or not 0.0 < float(p) < 1.0:
        raise InputError(f"p must be a probability strictly between 0 and 1; got {p!r}")
    if design not in DESIGNS:
        raise InputError(f"unknown design {design!r}; choose one of {list(DESIGNS)}")
    if design == "balanced":
        if samples & (samples - 1):
            raise InputError(
                f"design='balanced' needs samples to be a power of two; got {samples} (try {1 << samples.bit_length()})"
            )
        if float(p) != 0.5:
            raise InputError(
                f"design='balanced' puts every node in exactly half the samples, so p must be 0.5; got {p}"
            )
    check_batching(batch_size, memory_gb)


def sample_footprint(model: Model, seq_len: int, n_nodes: int) -> Footprint:
    """One sample's memory: the patched forward's activations plus its mask and float64 statistics
    work space over the N nodes."""
    return Footprint(patched_forward_bytes(model, seq_len) + n_nodes * ELEMENT_BYTES_PER_NODE)


def sample_batch(model: Model, seq_len: int, n_nodes: int, memory_gb: float, batch_size: int | None = None) -> int:
    """Samples per batch: ``batch_size``, else as many as fit ``memory_gb`` (``plan_batch`` of ``sample_footprint``)."""
    return plan_batch(sample_footprint(model, seq_len, n_nodes), memory_gb, model.device, batch_size=batch_size)


def sample_plan(
    model: Model, pairs: PromptPairs, node_types: list[str], memory_gb: float, batch_size: int | None, held: float
) -> tuple[int, int]:
    """(pairs per block, samples per batch) of a Subsampling that holds ``held`` bytes beside its blocks (its
    results). A block holds its pairs' base/source runs and running statistics, at most half of what ``held``
    and ``HEADROOM`` leave (``batching.pairs_per_block``); a batch takes the rest, each sample with its row of the
    per-pair one-hot the statistics are merged with. The batch is ``sample_batch``'s when all pairs fit one block."""
    seq_len = pairs.seq_len
    n_nodes = layout_elems(model, node_types, seq_len)
    per_pair = cache_bytes(model, 1, seq_len, node_types) + 2 * STATS_BYTES * n_nodes  # running and merged copies
    fix = "Raise memory_gb, use shorter prompts or fewer node types"
    kept = held + HEADROOM * memory_gb * GIB
    block = pairs_per_block(pairs.n_pairs, per_pair, memory_gb, "subsampling", fix, held=kept)
    if block == pairs.n_pairs:
        return block, sample_batch(model, seq_len, n_nodes, memory_gb, batch_size)
    footprint = sample_footprint(model, seq_len, n_nodes)
    per_sample = Footprint(footprint.per_item + 8 * block, held=kept + block * per_pair)
    return block, plan_batch(per_sample, memory_gb, model.device, batch_size=batch_size)


def subsample(
    model: Model,
    cache: PatchCache,
    node_types: list[str],
    *,
    samples: int,
    p: float,
    seed: int,
    design: str,
    cost: Cost,
    batch_size: int | None = None,
    memory_gb: float = 1.0,
    exclude: dict[str, torch.Tensor] | None = None,
    progress: bool = False,
) -> SubsamplingStats:
    """Run Algorithm 1 on every pair of ``cache`` and return the in/out statistics.

    Args:
        exclude: node type -> bool [*layout]; these nodes are never patched (their statistics are
            meaningless). Used by the false-negative bound to leave verified nodes alone.
    """
    seq_len = cache.pairs.seq_len
    layout = NodeLayout.of(node_types, model.sizes, seq_len)
    keep = keep_mask(layout, exclude)
    batch = sample_batch(model, seq_len, layout.size, memory_gb, batch_size)
    total = samples * cache.n_pairs
    with progress_bar(total, "subsampling", progress, unit="sample") as bar:
        values = subsample_range(
            model, cache, node_types, 0, total, samples=samples, p=p, seed=seed, design=design, batch=batch,
            keep=keep, cost=cost, advance=bar.update,
        )  # fmt: skip
    return SubsamplingStats(layout.shapes, values)
