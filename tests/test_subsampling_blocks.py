"""Subsampling and the false-negative bound in blocks of pairs; base/source runs in memory-sized chunks."""

from __future__ import annotations

import torch

import atpstar
from atpstar import engine
from atpstar.batching import HEADROOM
from atpstar.bound.statistics import NodeSums, node_bounds
from atpstar.distributed import executor_for
from atpstar.distributed.sweeps import subsample_on
from atpstar.engine import cache_bytes, element_bytes, prepare, prepare_step
from atpstar.methods.subsampling import sample_plan
from reference.models import build_hf, load, make_pairs

NODES = ["query", "head"]
SAMPLING = {"samples": 16, "p": 0.3, "seed": 3, "design": "random"}


def _sample(model, pairs, pair_block, reduce=None):
    cost = atpstar.Cost()
    stats, base_metric, info = subsample_on(
        executor_for(model, None, None, False), model, pairs, NODES, "noising", SAMPLING, 7, None, None, cost,
        pair_block, reduce,
    )  # fmt: skip
    return stats, base_metric, info, cost


def test_subsampling_in_pair_blocks_equals_all_pairs_at_once():
    """Blocks of 2 of 5 pairs draw every pair's subsets of a run over all pairs: the same statistics and cost."""
    model, pairs = load(build_hf("gpt2", n_layers=2)), make_pairs(n_pairs=5, seq_len=5)
    whole, whole_metric, _, whole_cost = _sample(model, pairs, None)
    blocked, blocked_metric, info, blocked_cost = _sample(model, pairs, 2)
    assert info["pair_block"] == 2 and info["prepare_runs"] == 3
    for name, value in whole.values.items():
        torch.testing.assert_close(blocked.values[name], value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(blocked_metric, whole_metric, rtol=1e-12, atol=1e-12)
    assert blocked_cost.forward == whole_cost.forward


def test_bound_sums_over_pair_blocks_equal_the_per_pair_statistics():
    """The bound keeps per-node sums only: block by block they give the bounds of the [P, N] statistics."""
    model, pairs = load(build_hf("llama", n_layers=2)), make_pairs(n_pairs=5, seq_len=5)
    whole, _, _, _ = _sample(model, pairs, None)
    sums, _, _, _ = _sample(model, pairs, 2, NodeSums.of)
    assert isinstance(sums, NodeSums) and sums.n_pairs == 5 and sums.diff.ndim == 1
    keep = torch.ones(whole.layout.size, dtype=torch.bool)
    expected = node_bounds(whole, keep, int(keep.sum()), 0.05, 0.5, "iut")
    for got, want in zip(node_bounds(sums, keep, int(keep.sum()), 0.05, 0.5, "iut"), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    one_block = node_bounds(NodeSums.of(whole), keep, int(keep.sum()), 0.05, 0.5, "iut")
    for got, want in zip(one_block, expected):  # one block: the very reductions of before
        assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))


def test_false_negative_bound_under_a_tight_budget_streams_with_the_same_result():
    """A budget that holds two pairs' runs, not five: the bound runs in blocks and bounds the same."""
    model, pairs = load(build_hf("gpt_neox", n_layers=2)), make_pairs(n_pairs=5, seq_len=5)
    verified = [("head", (0, 0, 4)), ("query", (1, 1, 4))]
    options = {"theta": 0.5, "samples": 16, "nodes": NODES, "batch_size": 6}
    whole = atpstar.false_negative_bound(model, pairs, verified, **options)
    per_pair = cache_bytes(model, 1, pairs.seq_len, NODES) + 2 * 48 * whole.n_unverified
    tight = 5 * per_pair / (1 - HEADROOM) / 2**30  # half of what the headroom leaves holds two pairs
    assert sample_plan(model, pairs, NODES, tight, 6, 0)[0] == 2
    blocked = atpstar.false_negative_bound(model, pairs, verified, memory_gb=tight, **options)
    assert blocked.info["pair_block"] == 2 and "pair_block" not in whole.info
    assert abs(blocked.max_effect_upper - whole.max_effect_upper) <= 1e-12 * abs(whole.max_effect_upper)
    assert abs(blocked.prob_upper - whole.prob_upper) <= 1e-12
    assert blocked.cost == whole.cost


def test_subsampling_method_under_a_tight_budget_returns_the_same_result():
    model, pairs = load(build_hf("gpt2", n_layers=2)), make_pairs(n_pairs=4, seq_len=5)
    options = {"samples": 8, "p": 0.4, "batch_size": 5}
    whole = atpstar.attribute(model, pairs, "subsampling", nodes=NODES, **options)
    n_nodes = sum(v[0].numel() for v in whole.per_pair.values())
    per_pair = cache_bytes(model, 1, pairs.seq_len, NODES) + 2 * 48 * n_nodes
    results = 8 * 8 * 4 * n_nodes
    tight = (results + 5 * per_pair) / (1 - HEADROOM) / 2**30  # the results, and two pairs' runs in half the rest
    assert sample_plan(model, pairs, NODES, tight, 5, results)[0] == 2
    blocked = atpstar.attribute(model, pairs, "subsampling", nodes=NODES, memory_gb=tight, **options)
    assert blocked.info["pair_block"] == 2
    for name, value in whole.extras.items():
        torch.testing.assert_close(blocked.extras[name], value, rtol=1e-12, atol=1e-12)
    assert blocked.cost == whole.cost


def test_prepare_runs_fewer_pairs_per_forward_than_the_batch(monkeypatch):
    """A chunk of k patched forwards' memory holds fewer than k pairs' forwards plus their records."""
    model, pairs = load(build_hf("gpt2", n_layers=2)), make_pairs(n_pairs=9, seq_len=5)
    sizes = []
    chunk_of = engine._prepare_chunk

    def counted(model, pairs, base_tokens, *rest):
        sizes.append(len(base_tokens))
        return chunk_of(model, pairs, base_tokens, *rest)

    monkeypatch.setattr(engine, "_prepare_chunk", counted)
    prepare(model, pairs, "noising", NODES, atpstar.Cost(), chunk=4)
    step = prepare_step(model, pairs.seq_len, NODES, 4)
    element = element_bytes(model, pairs.seq_len)
    assert step == 4 * element // (element + cache_bytes(model, 1, pairs.seq_len, NODES)) and step < 4
    assert max(sizes) == step and sum(sizes) == 9
