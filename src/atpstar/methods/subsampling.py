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
from dataclasses import dataclass
from typing import Any

import torch

from ..batching import BatchGuard
from ..cost import Cost
from ..engine import PatchCache, patch_masks, prepare
from ..errors import InputError
from ..memory import MemoryPlan, layout_elems, patched_forward_bytes, patching_plan
from ..model import Model
from ..nodes import NodeLayout
from ..ops import welford_merge
from ..pairs import PromptPairs
from ..progress import progress_bar
from ..validate import check_batching
from .base import Method, register

DESIGNS: tuple[str, ...] = ("random", "balanced")
STATS: tuple[str, ...] = ("count_in", "mean_in", "var_in", "count_out", "mean_out", "var_out")
STATS_BYTES = 6 * 8  # per pair and node: running (count, mean, M2) in and out, float64
ELEMENT_BYTES_PER_NODE = 40  # per patched forward and node: its mask and the batch's statistics work space
EXTRAS_BYTES = 8 * 8  # per pair and node: the returned estimate and six statistics (float64)


@register(
    "subsampling",
    summary="patch random node subsets jointly; estimate = mean effect with the node in - mean without",
)
class Subsampling(Method):
    """Subsampling: patch random node subsets jointly; ĉ(n) = mean Δ with n patched - mean Δ without.

    ``per_pair[t]`` [P, *layout] is ``mean_in - mean_out`` per pair (0 where a node was never in, or
    never out, of a sample); ``scores`` the mean of its absolute value over pairs. ``extras`` holds,
    per node type, ``count_in/<t>``, ``mean_in/<t>``, ``var_in/<t>`` (unbiased; 0 below 2 samples) and
    the same for ``out``, each [P, *layout] float64, for the Welch bound of spec §9.

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

    def __init__(
        self,
        *,
        samples: int = 256,
        p: float = 0.5,
        seed: int = 0,
        design: str = "random",
        batch_size: int | None = None,
        memory_gb: float = 1.0,
    ) -> None:
        self.samples = samples
        self.p = p
        self.seed = seed
        self.design = design
        self.batch_size = batch_size
        self.memory_gb = memory_gb

    def expected_cost(self, model: Model, pairs: PromptPairs, node_types: list[str], info: Mapping[str, Any]) -> Cost:
        """At most 2P full forwards and ``samples`` x P patched forwards."""
        return Cost(forward=2 * pairs.n_pairs + self.samples * pairs.n_pairs)

    def _validate(self, model: Model, pairs: PromptPairs, node_types: list[str]) -> None:
        check_options(self.samples, self.p, self.design, self.batch_size, self.memory_gb)

    def memory_plan(self, model: Model, n_pairs: int, seq_len: int, node_types: list[str]) -> MemoryPlan:
        nodes = layout_elems(model, node_types, seq_len)
        return patching_plan(
            model,
            self.id,
            n_pairs,
            seq_len,
            node_types,
            n_items=n_pairs * self.samples,
            run_bytes=STATS_BYTES * n_pairs * nodes,
            item_extra=ELEMENT_BYTES_PER_NODE * nodes,
            batch_size=self.batch_size,
            memory_gb=self.memory_gb,
            results_bytes=EXTRAS_BYTES * n_pairs * nodes,
        )

    def _attribute(
        self, model: Model, pairs: PromptPairs, node_types: list[str], direction: str, cost: Cost, progress: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        cache = prepare(model, pairs, direction, node_types, cost)
        stats = subsample(
            model,
            cache,
            node_types,
            samples=self.samples,
            p=self.p,
            seed=self.seed,
            design=self.design,
            batch_size=self.batch_size,
            memory_gb=self.memory_gb,
            cost=cost,
            progress=progress,
        )
        return self._finish(model, node_types, stats, {"base_metric": cache.base_metric.tolist()})

    def _attribute_on(
        self, executor: Any, model: Model, pairs: PromptPairs, node_types: list[str], direction: str, cost: Cost
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        from ..distributed.sweeps import subsample_on

        stats, base_metric, info = subsample_on(
            executor,
            model,
            pairs,
            node_types,
            direction,
            {"samples": self.samples, "p": self.p, "seed": self.seed, "design": self.design},
            self.batch_size,
            self.memory_gb,
            None,
            None,
            cost,
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


@dataclass
class SubsamplingStats:
    """Running in/out statistics per pair and node, flattened over node types.

    Attributes:
        shapes: node type -> per-pair layout; the flat node axis concatenates the types in this order.
        values: statistic name (``STATS``, with ``m2_in``/``m2_out`` instead of variances) -> [P, N] float64.
    """

    shapes: dict[str, tuple[int, ...]]
    values: dict[str, torch.Tensor]

    @property
    def layout(self) -> NodeLayout:
        return NodeLayout(self.shapes)

    def flat(self, name: str) -> torch.Tensor:
        """Statistic ``name`` (one of ``STATS``) over all nodes: [P, N] float64."""
        if name in ("var_in", "var_out"):
            side = name[4:]
            count = self.values[f"count_{side}"]
            return torch.where(
                count >= 2, self.values[f"m2_{side}"] / (count - 1).clamp(min=1), torch.zeros_like(count)
            )
        return self.values[name]

    def get(self, name: str, node_type: str) -> torch.Tensor:
        """Statistic ``name`` for one node type: [P, *layout]."""
        value = self.layout.unflatten(self.flat(name))[node_type]  # [P, N] -> [P, *layout]
        return value.long() if name.startswith("count") else value

    def estimate(self, node_type: str) -> torch.Tensor:
        """mean_in - mean_out per pair, 0 where either side has no sample: [P, *layout] float64."""
        seen = (self.get("count_in", node_type) > 0) & (self.get("count_out", node_type) > 0)
        diff = self.get("mean_in", node_type) - self.get("mean_out", node_type)
        return torch.where(seen, diff, torch.zeros_like(diff))


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
    batch = batch_size or sample_batch(model, seq_len, layout.size, memory_gb)
    total = samples * cache.n_pairs
    with progress_bar(total, "subsampling", progress, unit="sample") as bar:
        values = subsample_range(
            model, cache, node_types, 0, total, samples=samples, p=p, seed=seed, design=design, batch=batch,
            keep=keep, cost=cost, advance=bar.update,
        )  # fmt: skip
    return SubsamplingStats(layout.shapes, values)


def keep_mask(layout: NodeLayout, exclude: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """bool [N] over the layout's nodes: False where ``exclude`` (node type -> bool [*layout]) marks one."""
    if exclude is not None and any(t in exclude for t in layout.node_types):
        return ~layout.flatten(exclude, fill=False)  # [N]
    return torch.ones(layout.size, dtype=torch.bool)


def sample_batch(model: Model, seq_len: int, n_nodes: int, memory_gb: float) -> int:
    """Samples per batch within ``memory_gb``: the forward's activations plus masks and float64
    statistics work space over the N nodes, per element."""
    return max(1, int(memory_gb * 2**30 // (patched_forward_bytes(model, seq_len) + n_nodes * ELEMENT_BYTES_PER_NODE)))


def subsample_range(
    model: Model,
    cache: PatchCache,
    node_types: list[str],
    start: int,
    stop: int,
    *,
    samples: int,
    p: float,
    seed: int,
    design: str,
    batch: int,
    keep: torch.Tensor | None,
    cost: Cost,
    advance: Any = None,
) -> dict[str, torch.Tensor]:
    """Statistics of elements ``start``..``stop``-1 (element = sample x P + pair) in batches of
    ``batch`` from ``start``; ranges merge with ``ops.welford_merge`` (a work unit's share).

    Returns:
        ``count_in``, ``mean_in``, ``m2_in`` and the same for ``out``, each [P, N] float64.
    """
    n_pairs = cache.n_pairs
    layout = NodeLayout.of(node_types, model.sizes, cache.pairs.seq_len)
    n_nodes = layout.size
    keep = torch.ones(n_nodes, dtype=torch.bool) if keep is None else keep
    codes = _balanced_codes(n_nodes, samples, seed) if design == "balanced" else None
    values = {
        name: torch.zeros(n_pairs, n_nodes, dtype=torch.float64)
        for name in ("count_in", "mean_in", "m2_in", "count_out", "mean_out", "m2_out")
    }
    guard = BatchGuard("subsampling: patched forwards", model.device)  # halves on CUDA out-of-memory
    for first in range(start, stop, batch):
        element = torch.arange(first, min(first + batch, stop))
        pair_index, sample_index = element % n_pairs, element // n_pairs
        if codes is None:
            chosen = torch.stack(
                [_random_subset(n_nodes, p, seed, int(j), int(s)) for j, s in zip(pair_index, sample_index)]
            )  # [B, N]
        else:
            chosen = _balanced_subset(codes, sample_index)
        chosen &= keep
        masks = layout.unflatten(chosen)  # [B, N] -> {t: [B, *layout]}
        delta = patch_masks(model, cache, masks, pair_index, cost, guard).detach().double().cpu()  # [B]
        _update(values, chosen, delta, pair_index, n_pairs)
        if advance is not None:
            advance(len(element))
    return values


def _update(
    values: dict[str, torch.Tensor], chosen: torch.Tensor, delta: torch.Tensor, pair_index: torch.Tensor, n_pairs: int
) -> None:
    """Merge one batch of samples into the running per-pair, per-node statistics."""
    onehot = torch.nn.functional.one_hot(pair_index, n_pairs).double()  # [B, P]
    for side, member in (("in", chosen.double()), ("out", (~chosen).double())):
        count = onehot.T @ member  # [P, N]
        mean = (onehot.T @ (member * delta[:, None])) / count.clamp(min=1)
        m2 = onehot.T @ (member * (delta[:, None] - mean[pair_index]).square())
        merged = welford_merge(values[f"count_{side}"], values[f"mean_{side}"], values[f"m2_{side}"], count, mean, m2)
        values[f"count_{side}"], values[f"mean_{side}"], values[f"m2_{side}"] = merged


def _random_subset(n_nodes: int, p: float, seed: int, pair: int, sample: int) -> torch.Tensor:
    """Subset of sample ``sample`` on pair ``pair``: bool [N], from its own generator (batch-independent)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + pair) * 1_000_033 + sample)
    return torch.rand(n_nodes, generator=generator, dtype=torch.float64) < p


def _balanced_codes(n_nodes: int, samples: int, seed: int) -> torch.Tensor:
    """Hadamard column codes in 1..samples-1 per node: [N] int64 (distinct when N < samples)."""
    generator = torch.Generator().manual_seed(seed)
    if n_nodes < samples:
        return torch.randperm(samples - 1, generator=generator)[:n_nodes] + 1
    return torch.randint(1, samples, (n_nodes,), generator=generator)


def _balanced_subset(codes: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
    """Node n is in sample s iff popcount(s & code_n) is odd (Sylvester-Hadamard entry -1): bool [B, N]."""
    bits = sample_index[:, None] & codes[None, :]  # [B, N]
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return parity.bool()
