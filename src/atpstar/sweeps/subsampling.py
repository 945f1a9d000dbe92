"""Subsampling's engine: random joint patches of node subsets and their in/out statistics.

Per pair and sample, a subset S of the nodes (each in with probability ``p``, or a balanced
Hadamard design) is patched at once and Δ = L(patched) - L(base) recorded; per node, online
(Welford) counts, means and M2 of Δ over the samples where it was in and where it was out. Element
e = sample x P + pair; any range of elements is a work unit's share, and ranges merge exactly with
``ops.welford_merge``. ``atpstar.methods.subsampling`` (the method), ``atpstar.bound`` and
``atpstar.edges.subsampling`` use it.

Shape letters: P pairs, B batch, N nodes (all requested node types, flattened).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..batching import BatchGuard
from ..cost import Cost
from ..engine import PatchCache, patch_masks
from ..model import Model
from ..nodes import NodeLayout
from ..ops import welford_merge

STATS: tuple[str, ...] = ("count_in", "mean_in", "var_in", "count_out", "mean_out", "var_out")
RUNNING: tuple[str, ...] = ("count_in", "mean_in", "m2_in", "count_out", "mean_out", "m2_out")


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


def keep_mask(layout: NodeLayout, exclude: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """bool [N] over the layout's nodes: False where ``exclude`` (node type -> bool [*layout]) marks one."""
    if exclude is not None and any(t in exclude for t in layout.node_types):
        return ~layout.flatten(exclude, fill=False)  # [N]
    return torch.ones(layout.size, dtype=torch.bool)


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
    pair_offset: int = 0,
) -> dict[str, torch.Tensor]:
    """Statistics of elements ``start``..``stop``-1 (element = sample x P + pair) in batches of
    ``batch`` from ``start``; ranges merge with ``ops.welford_merge`` (a work unit's share).

    Args:
        pair_offset: the index of the cache's first pair among all pairs (a block of pairs draws the subsets
            those pairs draw in a run over all pairs).

    Returns:
        ``count_in``, ``mean_in``, ``m2_in`` and the same for ``out``, each [P, N] float64.
    """
    n_pairs = cache.n_pairs
    layout = NodeLayout.of(node_types, model.sizes, cache.pairs.seq_len)
    n_nodes = layout.size
    keep = torch.ones(n_nodes, dtype=torch.bool) if keep is None else keep
    codes = _balanced_codes(n_nodes, samples, seed) if design == "balanced" else None
    values = {name: torch.zeros(n_pairs, n_nodes, dtype=torch.float64) for name in RUNNING}
    guard = BatchGuard("subsampling: patched forwards", model.device)  # halves on CUDA out-of-memory
    for first in range(start, stop, batch):
        element = torch.arange(first, min(first + batch, stop))
        pair_index, sample_index = element % n_pairs, element // n_pairs
        if codes is None:
            chosen = torch.stack(
                [random_subset(n_nodes, p, seed, int(j) + pair_offset, int(s)) for j, s in zip(pair_index, sample_index)]
            )  # [B, N]
        else:
            chosen = _balanced_subset(codes, sample_index)
        chosen &= keep
        masks = layout.unflatten(chosen)  # [B, N] -> {t: [B, *layout]}
        delta = patch_masks(model, cache, masks, pair_index, cost, guard).detach().double().cpu()  # [B]
        update_stats(values, chosen, delta, pair_index, n_pairs)
        if advance is not None:
            advance(len(element))
    return values


def update_stats(
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


def random_subset(n_nodes: int, p: float, seed: int, pair: int, sample: int) -> torch.Tensor:
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
