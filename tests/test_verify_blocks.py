"""Memory-bounded verification and gradient steps: pairs in blocks, batches freed when they end."""

from __future__ import annotations

import gc

import torch

import atpstar
from atpstar.find import state as find_state
from atpstar.gradients.step import GradientStep
from atpstar.job import Job
from atpstar.spaces import spaces_for
from reference.models import build_hf, load, make_pairs

NODES = ["query", "key", "value", "head"]


def test_verify_in_pair_blocks_equals_one_block_at_the_same_cost():
    """A budget that holds one pair's prepared runs but not all: blocks of one pair, the same effects and cost."""
    model, pairs = load(build_hf("llama", n_layers=2)), make_pairs(n_pairs=4, seq_len=5)
    estimate = atpstar.attribute(model, pairs, "atp", nodes=NODES)
    whole = atpstar.verify(model, pairs, estimate, budget=30, batch_size=8)
    per_pair = spaces_for(model, NODES)[0].pair_bytes(Job(model, pairs, "noising", atpstar.Cost(), False))
    tight = 2.5 * per_pair / 2**30  # half the budget holds one pair's runs, not two
    blocked = atpstar.verify(model, pairs, estimate, budget=30, batch_size=8, memory_gb=tight)
    assert blocked.nodes == whole.nodes
    torch.testing.assert_close(blocked.effects, whole.effects, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(blocked.base_metric, whole.base_metric, rtol=1e-12, atol=1e-12)
    assert blocked.cost == whole.cost


def test_a_budget_below_one_pair_is_refused_with_the_sizes():
    model, pairs = load(build_hf("gpt2", n_layers=2)), make_pairs(n_pairs=2, seq_len=5)
    estimate = atpstar.attribute(model, pairs, "atp", nodes=NODES)
    try:
        atpstar.verify(model, pairs, estimate, budget=3, memory_gb=1e-9)
    except atpstar.InputError as err:
        assert "memory_gb=1e-09 is too small" in str(err) and "one pair's prepared runs" in str(err)
    else:
        raise AssertionError("a budget below one pair was accepted")


def test_a_gradient_step_leaves_no_cycle_that_holds_its_batch():
    """Without the cycle collector, nothing of a finished batch (its step, runs and graph) stays alive."""
    model, pairs = load(build_hf("gpt_neox", n_layers=2)), make_pairs(n_pairs=3, seq_len=5)
    gc.collect()
    gc.disable()
    try:
        atpstar.attribute(model, pairs, "atp*", nodes=NODES, batch_size=1)
        alive = [o for o in gc.get_objects() if type(o) is GradientStep]
    finally:
        gc.enable()
    assert alive == []


def test_find_verifies_in_pair_blocks_with_the_same_outcome(monkeypatch):
    """``find`` under a budget that splits the pairs: the same nodes, effects, certificate and cost."""
    model, pairs = load(build_hf("gpt2", n_layers=2)), make_pairs(n_pairs=4, seq_len=5)
    job = Job(model, pairs, "noising", atpstar.Cost(), False)
    tight = 2.5 * spaces_for(model, NODES)[0].pair_bytes(job) / 2**30
    whole = atpstar.find(model, pairs, theta=0.05, nodes=NODES, batch_size=8)
    prepared = []
    original = find_state.prepare
    monkeypatch.setattr(find_state, "prepare", lambda m, p, *a, **k: prepared.append(p.n_pairs) or original(m, p, *a, **k))
    blocked = atpstar.find(model, pairs, theta=0.05, nodes=NODES, batch_size=8, memory_gb=tight,
                           estimator_options={"memory_gb": 1.0})  # the estimate at its own budget
    assert prepared and max(prepared) == 1  # every verification held one pair's runs at a time
    assert blocked.names == whole.names and blocked.certified == whole.certified
    torch.testing.assert_close(blocked.effects, whole.effects, rtol=1e-12, atol=1e-12)
    assert blocked.cost == whole.cost


def test_prepare_in_chunks_holds_the_same_cache():
    """Base and source runs in chunks of one pair: the same cache and base metric as one forward."""
    from atpstar.engine import prepare

    model, pairs = load(build_hf("llama", n_layers=2)), make_pairs(n_pairs=3, seq_len=5)
    whole_cost, chunked_cost = atpstar.Cost(), atpstar.Cost()
    whole = prepare(model, pairs, "noising", NODES, whole_cost)
    chunked = prepare(model, pairs, "noising", NODES, chunked_cost, chunk=1)
    for name in ("resid", "keys", "values"):
        for a, b in zip(getattr(whole, name), getattr(chunked, name)):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    for t in NODES:
        for a, b in zip(whole.source[t], chunked.source[t]):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked.base_metric, whole.base_metric, rtol=1e-12, atol=1e-12)
    assert chunked_cost == whole_cost
