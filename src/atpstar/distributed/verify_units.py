"""Verification as work units: windows of consecutive ranks, each patching its nodes on every pair.

A window's size depends on the node count and the executor's workers when a sweep starts; a resumed
sweep keeps the windows its folder was started with, so a run resumed with another worker count never
mixes windows of two sizes.

Shape letters: P pairs, N nodes.
"""

from __future__ import annotations

import math

import torch

from ..cost import Cost
from ..model import Model
from ..pairs import PromptPairs
from .run import Executor, digest, run_units, sum_costs, target_units, unit_store
from .store import saved_layout
from .units import RankUnit, Sweep

# Largest verification window (nodes).
MAX_WINDOW = 4096



def rank_window(n_nodes: int, target: int) -> int:
    """Ranks per verification window: about ``target`` windows, at most ``MAX_WINDOW`` nodes each."""
    return max(1, min(MAX_WINDOW, math.ceil(n_nodes / target)))


def plan_rank_units(n_nodes: int, n_pairs: int, target: int = 8, window: int | None = None) -> list[RankUnit]:
    """Windows of consecutive ranks: ``window`` nodes each, else ``rank_window(n_nodes, target)``."""
    window = window or rank_window(n_nodes, target)
    return [
        RankUnit(start, min(start + window, n_nodes), (min(start + window, n_nodes) - start) * n_pairs, 1.0)
        for start in range(0, n_nodes, window)
    ]


def verify_on(
    executor: Executor,
    model: Model,
    pairs: PromptPairs,
    node_types: list[str],
    direction: str,
    ranked: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    batch: int,
    checkpoint: str | None,
    cost: Cost,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Exact effects [N, P] of ranked nodes as windows of ranks, the base metric [P], and run facts."""
    tensors = dict(zip(("type", "layer", "unit", "pos"), ranked))
    sweep = Sweep("verify", pairs, direction, list(node_types), {"batch": batch}, tensors)
    n_nodes = len(ranked[0])
    if n_nodes == 0:  # nothing to verify: still run the base once for its metric
        from ..engine import prepare

        return (
            torch.zeros(0, pairs.n_pairs, dtype=torch.float64),
            prepare(model, pairs, direction, node_types, cost).base_metric,
            {"workers": executor.workers, "units": 0},
        )
    ranked_digest = digest(torch.stack(ranked))
    window = rank_window(n_nodes, target_units(executor))
    saved = saved_layout(checkpoint)
    if isinstance(saved, dict) and saved.get("nodes") == n_nodes and saved.get("ranked") == ranked_digest:
        # Resuming: the folder's windows, whatever the worker count now (windows of two sizes never mix).
        window = saved["window"] if isinstance(saved.get("window"), int) and saved["window"] > 0 else window
    units = plan_rank_units(n_nodes, pairs.n_pairs, window=window)
    layout = {"nodes": n_nodes, "ranked": ranked_digest, "window": window}
    store = unit_store(checkpoint, "verify", model, sweep, layout)
    results, info = run_units(executor, sweep, units, store, "verify")
    effects = torch.cat([r.tensors["effects"] for r in results])  # windows in rank order: [N, P]
    sum_costs(results, cost)
    return effects, results[0].tensors["base_metric"], info
