"""CUDA out-of-memory inside a batch: the batch is halved and retried, the user is warned, results are unchanged.

No GPU is needed: a wrapper raises ``torch.cuda.OutOfMemoryError`` (constructible on any build) whenever a
batch is larger than a pretend capacity, exactly where a real allocation would fail.
"""

from __future__ import annotations

import pytest
import torch

import atpstar
from atpstar import engine
from atpstar.batching import BatchGuard
from atpstar.errors import OutOfMemory
from atpstar.methods.atp import AttributionPatching
from reference.models import build_hf, load, make_pairs


def oom_above(capacity: int, size_of):
    """Wrap a function so it raises CUDA OOM when ``size_of(args)`` exceeds ``capacity``; count the calls."""

    def wrap(fn):
        def wrapped(*args, **kwargs):
            wrapped.calls.append(size_of(*args, **kwargs))
            if size_of(*args, **kwargs) > capacity:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return fn(*args, **kwargs)

        wrapped.calls = []
        return wrapped

    return wrap


@pytest.fixture(scope="module")
def model():
    return load(build_hf("llama", n_layers=2, seed=11))


@pytest.fixture(scope="module")
def pairs():
    return make_pairs(n_pairs=6, seq_len=5, seed=12)


def test_guard_halves_and_remembers():
    guard = BatchGuard("things")
    seen = []

    def step(part: slice):
        seen.append(part.stop - part.start)
        if part.stop - part.start > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return list(range(part.start, part.stop))

    with pytest.warns(UserWarning, match="out of memory .* batch of 10; halved it to 5"):
        out = guard.run(10, step)
    assert [x for part in out for x in part] == list(range(10))
    assert seen[:3] == [10, 5, 2] and guard.limit == 2 and guard.retries == 2
    assert max(seen[3:]) == 2  # later slices start at the size that fit


def test_guard_reraises_other_errors_and_gives_up_at_one():
    guard = BatchGuard("things")
    with pytest.raises(KeyError):
        guard.run(4, lambda part: {}["missing"])
    with pytest.raises(OutOfMemory, match="even for a batch of one"), pytest.warns(UserWarning):
        guard.run(2, lambda part: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("CUDA out of memory")))


@pytest.mark.parametrize("method_id", ["atp", "atp*"])
def test_gradient_methods_halve_pairs(method_id, model, pairs, monkeypatch):
    want = atpstar.attribute(model, pairs, method=method_id, nodes=["neuron", "key"], batch_size=6)
    flaky = oom_above(2, lambda self, model, pairs, index, *rest: len(index))(AttributionPatching._estimate)
    monkeypatch.setattr(AttributionPatching, "_estimate", flaky)
    with pytest.warns(UserWarning, match="out of memory"):
        got = atpstar.attribute(model, pairs, method=method_id, nodes=["neuron", "key"], batch_size=6)
    assert flaky.calls[:3] == [6, 3, 1] and max(flaky.calls) == 6
    assert got.info["oom_retries"] == 2
    for t in want.per_pair:
        torch.testing.assert_close(
            got.per_pair[t], want.per_pair[t], rtol=1e-10, atol=1e-13
        )  # batch shapes change float64 rounding only
    assert got.cost.forward_equivalents == want.cost.forward_equivalents  # failed batches are not counted


def test_exact_patching_halves_patched_forwards(model, pairs, monkeypatch):
    want = atpstar.attribute(model, pairs, method="activation_patching", nodes=["query"], batch_size=16)
    flaky = oom_above(5, lambda model, cache, layer, types, type_index, *rest: len(type_index))(engine.patch_node_batch)
    monkeypatch.setattr(engine, "patch_node_batch", flaky)
    with pytest.warns(UserWarning, match="out of memory"):
        got = atpstar.attribute(model, pairs, method="activation_patching", nodes=["query"], batch_size=16)
    assert max(flaky.calls) == 16 and min(flaky.calls) <= 4
    torch.testing.assert_close(
        got.per_pair["query"], want.per_pair["query"], rtol=1e-10, atol=1e-13
    )  # batch shapes change float64 rounding only
    assert got.cost.forward_equivalents == pytest.approx(want.cost.forward_equivalents)


@pytest.mark.parametrize("method_id", ["subsampling", "blocks"])
def test_joint_patching_halves_batches(method_id, model, pairs, monkeypatch):
    options = {"samples": 4} if method_id == "subsampling" else {"block_size": 4}
    want = atpstar.attribute(model, pairs, method=method_id, nodes=["value"], batch_size=8, **options)
    flaky = oom_above(3, lambda model, cache, masks, pair_index, cost: len(pair_index))(engine._patch_masks_once)
    monkeypatch.setattr(engine, "_patch_masks_once", flaky)
    with pytest.warns(UserWarning, match="out of memory"):
        got = atpstar.attribute(model, pairs, method=method_id, nodes=["value"], batch_size=8, **options)
    assert min(flaky.calls) <= 3
    torch.testing.assert_close(
        got.per_pair["value"], want.per_pair["value"], rtol=1e-10, atol=1e-13
    )  # batch shapes change float64 rounding only


# The batch planner ------------------------------------------------------------------------------


def test_plan_batch_fills_the_budget_next_to_what_the_loop_holds():
    from atpstar.batching import GIB, Footprint, plan_batch

    assert plan_batch(GIB / 8, 1.0) == 8
    assert plan_batch(Footprint(GIB / 8, held=GIB / 2), 1.0) == 4
    assert plan_batch(Footprint(GIB / 8, held=GIB / 2), 1.0, batch_size=3) == 3  # the user's batch wins
    assert plan_batch(Footprint(GIB / 8), 1.0, most=5) == 5
    assert plan_batch(Footprint(2 * GIB), 1.0) == 1  # at least one element unless asked to refuse


def test_plan_batch_counts_host_results_only_on_the_cpu():
    from atpstar.batching import GIB, Footprint, plan_batch

    footprint = Footprint(GIB / 8, held=0, host=GIB / 2)
    assert plan_batch(footprint, 1.0, "cpu") == 4
    assert plan_batch(footprint, 1.0, torch.device("meta")) == 8


def test_plan_batch_refuses_a_budget_too_small_for_one_element_when_named():
    from atpstar.batching import GIB, Footprint, plan_batch
    from atpstar.errors import InputError

    with pytest.raises(InputError, match="blocks: memory_gb=0.5 is too small.*Raise memory_gb"):
        plan_batch(Footprint(GIB / 4, held=GIB / 2), 0.5, what="blocks")


def test_every_budgeted_loop_uses_the_planner():
    """The sweeps size their batches with ``plan_batch`` (same numbers as the formulas they replaced)."""
    from atpstar.batching import Footprint, plan_batch
    from atpstar.memory import patched_forward_bytes
    from atpstar.methods.subsampling import ELEMENT_BYTES_PER_NODE, sample_batch

    model = load(build_hf("gpt2", n_layers=2))
    per_item = patched_forward_bytes(model, 5) + 100 * ELEMENT_BYTES_PER_NODE
    assert sample_batch(model, 5, 100, 0.01) == max(1, int(0.01 * 2**30 // per_item))
    assert sample_batch(model, 5, 100, 0.01) == plan_batch(Footprint(per_item), 0.01, model.device)
    assert sample_batch(model, 5, 100, 0.01, batch_size=7) == 7
