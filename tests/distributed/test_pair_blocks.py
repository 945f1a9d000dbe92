"""Any method whose pairs do not interact runs as whole calls on blocks of pairs with no code of its own:
``Attribution.concat`` merges the blocks into the result of one call (in-process executor here; Ray in
``test_ray_workers``)."""

from __future__ import annotations

import pickle

import pytest
import torch

import atpstar
from atpstar.distributed import LocalExecutor
from atpstar.distributed.sweeps import plan_pair_units
from atpstar.errors import InputError
from atpstar.methods.base import METHODS, _by_pair_blocks, runs_on_workers
from atpstar.result import Attribution
from reference.models import assert_rel_close, build_hf, load, make_pairs

NODES = ["neuron", "query", "key", "value", "head"]
REL = 1e-12  # float64 models: the block a pair is batched with changes only rounding


@pytest.fixture(scope="module")
def gpt2():
    return load(build_hf("gpt2", n_layers=2)), make_pairs(n_pairs=5, seq_len=5)


def _same(result: Attribution, expected: Attribution) -> None:
    assert result.node_types == expected.node_types and result.n_pairs == expected.n_pairs
    for t in expected.per_pair:
        assert_rel_close(result.per_pair[t], expected.per_pair[t], REL, f"per_pair {t}")
        assert_rel_close(result.scores[t], expected.scores[t], REL, f"scores {t}")
    assert result.cost.forward == pytest.approx(expected.cost.forward)
    assert result.cost.backward == pytest.approx(expected.cost.backward)
    assert result.info["identity"] == expected.info["identity"]


@pytest.mark.parametrize(("method", "nodes"), [("atp*", NODES), ("atp*", ["edge"]), ("atp+ig", ["neuron", "head"])])
def test_pair_blocks_on_the_local_executor_equal_one_call(gpt2, method, nodes):
    model, pairs = gpt2
    expected = atpstar.attribute(model, pairs, method, nodes=nodes)
    result = _by_pair_blocks(METHODS[method](), LocalExecutor(model, False), model, pairs, nodes, "noising", None)
    _same(result, expected)
    assert result.info["units"] == 5 and result.info["n_pairs"] == 5


def test_concat_merges_blocks_of_pairs_as_one_call(gpt2):
    model, pairs = gpt2
    whole = atpstar.attribute(model, pairs, "subsampling", nodes=["head"], samples=4, batch_size=3)
    parts = [whole]  # a single part is the whole
    assert torch.equal(Attribution.concat(parts).scores["head"], whole.scores["head"])
    blocks = [pairs.subset([0, 1]), pairs.subset([2, 3, 4])]
    halves = [atpstar.attribute(model, b, "atp", nodes=["head", "value"]) for b in blocks]
    expected = atpstar.attribute(model, pairs, "atp", nodes=["head", "value"])
    merged = Attribution.concat(halves, {"identity": expected.identity})
    _same(merged, expected)
    assert merged.info["n_pairs"] == 5


def test_concat_keeps_extras_on_the_pair_axis_and_sums_counts():
    def part(n: int, info: dict) -> Attribution:
        per_pair = {"head": torch.arange(n * 2.0).reshape(n, 1, 2, 1)}
        extras = {"count_in/head": torch.ones(n, 1, 2, 1)}
        cost = atpstar.Cost(forward=n)
        return Attribution("x", {}, "noising", "m", "id", per_pair, {}, "mean", cost, extras, info)

    first = {"n_pairs": 2, "oom_retries": 1, "l": [1, 2], "same": 2}
    merged = Attribution.concat([part(2, first), part(3, {"n_pairs": 3, "l": [3], "same": 2, "oom_retries": 1})])
    assert merged.per_pair["head"].shape == (5, 1, 2, 1) and merged.extras["count_in/head"].shape == (5, 1, 2, 1)
    assert torch.equal(merged.scores["head"], merged.per_pair["head"].mean(0))
    assert merged.cost.forward == 5 and merged.info == {"n_pairs": 5, "oom_retries": 2, "l": [1, 2, 3], "same": 2}


def test_concat_refuses_parts_of_different_computations(gpt2):
    model, pairs = gpt2
    a = atpstar.attribute(model, pairs.subset([0]), "atp", nodes=["head"])
    b = atpstar.attribute(model, pairs.subset([1]), "atp*", nodes=["head"])
    with pytest.raises(InputError, match="differ in \\['method', 'options'\\]"):
        Attribution.concat([a, b])
    with pytest.raises(InputError, match="at least one part"):
        Attribution.concat([])


def test_which_methods_run_on_workers():
    on_workers = {m for m, r in METHODS.items() if runs_on_workers(r.cls)}
    assert {"atp", "atp*", "atp+qkfix", "atp+graddrop", "atp+ig", "activation_patching"} <= on_workers
    by_pairs = {m for m in on_workers if not METHODS[m].cls.distributable}
    assert "subsampling" not in by_pairs and "hierarchical" not in by_pairs  # seeded / pairs interact


def test_preset_methods_travel_by_id_and_options():
    method = METHODS["atp*"](batch_size=3)
    back = pickle.loads(pickle.dumps(method))
    assert type(back) is type(method) and back.get_options() == method.get_options() and back.id == "atp*"


def test_pair_units_cover_the_pairs_in_order():
    units = plan_pair_units(10, 4)
    assert [(u.start, u.stop) for u in units] == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert [(u.start, u.stop) for u in plan_pair_units(2, 8)] == [(0, 1), (1, 2)]
