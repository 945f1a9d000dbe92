"""Memory prediction: the batch fits ``memory_gb``, a budget too small is refused before any pass, and the
prediction is said in the progress output and recorded in ``info["memory"]``.

Whether predictions bound measured peaks is checked by ``benchmarks/scaling.py`` (timings and peaks
belong to benchmarks, not tests).
"""

from __future__ import annotations

import pytest

import atpstar
from atpstar.errors import InputError
from atpstar.gradients import path
from atpstar.memory import GB, gradient_plan, weights_bytes
from reference.models import build_hf, load, make_pairs

METHOD_IDS = sorted(atpstar.METHODS)


@pytest.fixture(scope="module")
def model():
    return load(build_hf("llama", n_layers=2, seed=31))


@pytest.mark.parametrize("method_id", METHOD_IDS)
def test_every_method_predicts_and_fits_its_budget(method_id, model, capsys):
    pairs = make_pairs(n_pairs=2, seq_len=4, seed=32)
    options = {"samples": 4} if method_id == "subsampling" else {}
    result = atpstar.attribute(model, pairs, method=method_id, nodes=["query"], progress=True, **options)
    plan = result.info["memory"]
    assert plan["method"] == method_id and plan["batch"] >= 1
    assert plan["working_gb"] <= plan["budget_gb"]
    assert plan["peak_gb"] == pytest.approx(plan["weights_gb"] + plan["working_gb"])
    assert plan["weights_gb"] == pytest.approx(weights_bytes(model) / GB)
    assert "predicted peak" in capsys.readouterr().err


def test_batch_grows_with_the_budget_and_shrinks_with_prompt_length(model):
    def batch(memory_gb, seq_len):
        kwargs = dict(qk_fix=True, grad_drop=True, keep="all", top_k=1, batch_size=None, memory_gb=memory_gb)
        return gradient_plan(model, "atp*", 10_000, seq_len, ["neuron", "query"], **kwargs)

    assert batch(2.0, 16).batch > batch(1.0, 16).batch
    assert batch(1.0, 64).per_item_gb > 4 * batch(1.0, 16).per_item_gb  # attention patterns grow as T²


def test_too_small_a_budget_is_refused_before_any_pass(model):
    pairs = make_pairs(n_pairs=2, seq_len=4, seed=33)
    with pytest.raises(InputError, match="memory_gb=1e-06 is too small.*keep='top'"):
        atpstar.attribute(model, pairs, method="atp*", nodes=["neuron"], memory_gb=1e-6)
    with pytest.raises(InputError, match="memory_gb=1e-06 is too small"):
        atpstar.attribute(model, pairs, method="activation_patching", nodes=["neuron"], memory_gb=1e-6)


def test_keeping_top_k_needs_less_than_dense_results(model):
    kwargs = dict(qk_fix=False, grad_drop=False, top_k=10, batch_size=None, memory_gb=4.0)
    dense = gradient_plan(model, "atp", 100_000, 32, ["neuron"], keep="all", **kwargs)
    top = gradient_plan(model, "atp", 100_000, 32, ["neuron"], keep="top", **kwargs)
    assert top.fixed_gb < dense.fixed_gb / 5


def test_predict_memory_before_running(model):
    plan = atpstar.predict_memory(model, 256, 512, method="atp*", nodes=["neuron"], keep="top", memory_gb=8)
    assert isinstance(plan, atpstar.MemoryPlan) and plan.working_gb <= 8 and plan.batch >= 1
    with pytest.raises(InputError, match="too small"):
        atpstar.predict_memory(model, 256, 512, method="atp*", nodes=["neuron"], memory_gb=1e-6)


def test_a_path_holds_the_gradients_summed_over_its_points(model):
    """atp+ig's plan is AtP's plus one running sum per grad site and layer (none for a one-point path)."""
    kwargs = dict(qk_fix=False, grad_drop=False, keep="all", top_k=1, batch_size=None, memory_gb=4.0)
    nodes = ["neuron", "query", "key", "value", "head"]
    atp = gradient_plan(model, "atp", 8, 16, nodes, **kwargs)
    one = gradient_plan(model, "atp+ig", 8, 16, nodes, points=path(1), **kwargs)
    five = gradient_plan(model, "atp+ig", 8, 16, nodes, points=path(5), **kwargs)
    assert one.per_item_gb == atp.per_item_gb < five.per_item_gb
    s = model.sizes
    sums = s.n_layers * 16 * (s.d_mlp + (2 * s.n_heads + 2 * s.n_kv_heads) * s.d_head) * 8  # float64 model
    assert five.per_item_gb - atp.per_item_gb == pytest.approx(sums / GB)
