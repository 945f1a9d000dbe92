"""The contract every registered method meets, run over ``atpstar.METHODS`` (including methods added later).

Only the common API is used: ``METHODS[id]()`` with default options and ``.attribute(model, pairs, nodes)``.
"""

from __future__ import annotations

import pytest
import torch
from reference.models import assert_unchanged, build_hf, load, make_pairs, snapshot

import atpstar
from atpstar.nodes import node_shape

ALL = ["neuron", "query", "key", "value", "head"]
METHOD_IDS = sorted(atpstar.METHODS)
DOCUMENTED_GRADDROP = {"atp+graddrop", "atp*"}


def cls_of(method_id):
    return atpstar.METHODS[method_id].cls


def supported(method_id):
    return [t for t in ALL if t in cls_of(method_id).node_types]


def is_seeded(method_id):
    return bool(getattr(cls_of(method_id), "seeded", False))


@pytest.fixture(scope="module")
def contract_model():
    return load(build_hf("llama", seed=8))


@pytest.fixture(scope="module")
def contract_pairs():
    return make_pairs(n_pairs=3, seq_len=5, seed=9)


@pytest.fixture(scope="module")
def results(contract_model, contract_pairs):
    """One run per method (with a snapshot check of the model around it), shared by the tests below."""
    out = {}
    for method_id in METHOD_IDS:
        before = snapshot(contract_model.hf_model)
        out[method_id] = atpstar.METHODS[method_id]().attribute(contract_model, contract_pairs, supported(method_id))
        assert_unchanged(contract_model.hf_model, before)
    return out


def test_core_methods_registered():
    for method_id in ("activation_patching", "atp", "atp+qkfix", "atp+graddrop", "atp*"):
        assert method_id in atpstar.METHODS


@pytest.mark.parametrize("method_id", METHOD_IDS)
def test_documented_shapes_and_record(method_id, results, contract_model, contract_pairs):
    result = results[method_id]
    assert isinstance(result, atpstar.Attribution)
    assert result.method == method_id and result.direction == "noising" and result.metric == "logit_diff"
    assert result.node_types == supported(method_id)
    for t in supported(method_id):
        layout = node_shape(t, contract_model.sizes, contract_pairs.seq_len)
        assert tuple(result.per_pair[t].shape) == (3, *layout), t
        assert tuple(result.scores[t].shape) == layout, t
        assert torch.isfinite(result.per_pair[t]).all(), t
    assert result.cost.forward_equivalents > 0
    assert result.info.get("atpstar_version") == atpstar.__version__


def test_layouts_are_the_documented_ones(contract_model):
    s = contract_model
    assert node_shape("neuron", s.sizes, 5) == (s.n_layers, 5, s.d_mlp)
    assert node_shape("query", s.sizes, 5) == (s.n_layers, s.n_heads, 5)
    assert node_shape("head", s.sizes, 5) == (s.n_layers, s.n_heads, 5)
    assert node_shape("key", s.sizes, 5) == (s.n_layers, s.n_kv_heads, 5) == node_shape("value", s.sizes, 5)


@pytest.mark.parametrize("method_id", METHOD_IDS)
def test_same_answer_twice(method_id, results, contract_model, contract_pairs):
    again = atpstar.METHODS[method_id]().attribute(contract_model, contract_pairs, supported(method_id))
    for t in supported(method_id):
        assert torch.allclose(again.per_pair[t], results[method_id].per_pair[t], rtol=1e-12, atol=1e-14), t


@pytest.mark.parametrize("method_id", METHOD_IDS)
def test_per_pair_independent_of_batch(method_id, results, contract_model, contract_pairs):
    """Style contract. A method whose per-pair values by design depend on the other pairs must say so with a
    class flag ``pairs_interact = True`` (then only shapes are compared)."""
    interact = bool(getattr(cls_of(method_id), "pairs_interact", False))
    if method_id == "hierarchical" and not interact:
        pytest.xfail("hierarchical splits blocks on the mean |effect| over all pairs, so per_pair depends on the "
                     "batch (documented in its docstring) but the class does not declare pairs_interact = True")
    together = results[method_id]
    for i in range(contract_pairs.n_pairs):
        alone = atpstar.METHODS[method_id]().attribute(contract_model, contract_pairs.subset([i]), supported(method_id))
        for t in supported(method_id):
            assert alone.per_pair[t].shape == together.per_pair[t][i : i + 1].shape
            if not is_seeded(method_id) and not interact:
                scale = float(together.per_pair[t].abs().max()) + 1e-300
                err = float((alone.per_pair[t][0] - together.per_pair[t][i]).abs().max())
                assert err <= 1e-10 * scale, f"{method_id} {t} pair {i}: {err:.2e}"


def documented_cost(method_id, model, pairs, node_types):
    """(forward, backward) passes over single prompts, as each core method documents them."""
    n_pairs, n_layers, seq = pairs.n_pairs, model.n_layers, pairs.seq_len
    if method_id == "activation_patching":
        forward = 2 * n_pairs
        for t in node_types:
            per_layer = node_shape(t, model.sizes, seq)[1] * node_shape(t, model.sizes, seq)[2]
            forward += sum(n_pairs * per_layer * (n_layers - layer) / n_layers for layer in range(n_layers))
        return forward, 0.0
    backward = n_pairs
    if method_id in DOCUMENTED_GRADDROP:
        backward += sum(n_pairs * layer / n_layers for layer in range(1, n_layers))
    return 2 * n_pairs, backward


@pytest.mark.parametrize("method_id", ["activation_patching", "atp", "atp+qkfix", "atp+graddrop", "atp*"])
def test_cost_equals_documented_count(method_id, results, contract_model, contract_pairs):
    cost = results[method_id].cost
    forward, backward = documented_cost(method_id, contract_model, contract_pairs, supported(method_id))
    assert cost.forward == pytest.approx(forward, rel=1e-12)
    assert cost.backward == pytest.approx(backward, rel=1e-12, abs=1e-12)
    assert cost.forward_equivalents == pytest.approx(forward + 2 * backward, rel=1e-12)


@pytest.mark.parametrize("method_id", METHOD_IDS)
def test_save_load_round_trip(method_id, results, tmp_path):
    result = results[method_id]
    result.save(tmp_path / "result")
    loaded = atpstar.Attribution.load(tmp_path / "result")
    assert (loaded.method, loaded.direction, loaded.metric, loaded.aggregation) == (
        result.method, result.direction, result.metric, result.aggregation)
    assert loaded.model_id == result.model_id
    assert loaded.cost.to_dict() == result.cost.to_dict()
    assert loaded.node_types == result.node_types
    for t in result.node_types:
        assert torch.equal(loaded.per_pair[t], result.per_pair[t])
        assert torch.equal(loaded.scores[t], result.scores[t])
    assert set(loaded.extras) == set(result.extras)
    assert [n.name for n in loaded.top(5)] == [n.name for n in result.top(5)]


@pytest.mark.parametrize("method_id", METHOD_IDS)
def test_model_unchanged_after_error(method_id, contract_model):
    calls = []

    def failing(logits, answer, distractor):
        calls.append(1)
        if len(calls) > 1 or logits.requires_grad:  # mid-run: after the first pass, or inside a graph
            raise RuntimeError("metric failed mid-run")
        return logits[:, 0]

    before = snapshot(contract_model.hf_model)
    pairs = make_pairs(n_pairs=2, seq_len=5, metric=failing)
    with pytest.raises(RuntimeError, match="metric failed"):
        atpstar.METHODS[method_id]().attribute(contract_model, pairs, supported(method_id))
    assert_unchanged(contract_model.hf_model, before)


@pytest.mark.parametrize("method_id", METHOD_IDS)
def test_bad_input_fails_before_any_pass(method_id, contract_model):
    calls = []

    def counting(logits, answer, distractor):
        calls.append(1)
        return logits[:, 0]

    pairs = make_pairs(n_pairs=2, seq_len=5, metric=counting)
    method = atpstar.METHODS[method_id]()
    with pytest.raises(atpstar.InputError, match="direction"):
        method.attribute(contract_model, pairs, supported(method_id), direction="nosing")
    with pytest.raises(atpstar.InputError, match="neurons"):
        method.attribute(contract_model, pairs, ["neurons"])
    with pytest.raises(atpstar.InputError):
        method.attribute(contract_model, pairs, [])
    with pytest.raises(atpstar.InputError):
        method.attribute(contract_model, (pairs.clean, pairs.noise), supported(method_id))
    assert calls == []


@pytest.mark.parametrize("method_id", METHOD_IDS)
def test_metric_of_wrong_shape(method_id, contract_model):
    pairs = make_pairs(n_pairs=2, seq_len=5, metric=lambda logits, answer, distractor: logits.sum())
    with pytest.raises(atpstar.InputError, match="shape"):
        atpstar.METHODS[method_id]().attribute(contract_model, pairs, supported(method_id))


def test_unknown_method_lists_choices(contract_model, contract_pairs):
    with pytest.raises(atpstar.InputError) as err:
        atpstar.attribute(contract_model, contract_pairs, method="atp-star")
    for method_id in atpstar.METHODS:
        assert method_id in str(err.value)


def test_unknown_option_and_preset_clash(contract_model, contract_pairs):
    with pytest.raises(atpstar.InputError, match="option"):
        atpstar.attribute(contract_model, contract_pairs, method="atp", no_such_option=1)
    with pytest.raises(atpstar.InputError, match="fixed"):
        atpstar.METHODS["atp*"](qk_fix=False)


def test_mismatched_prompt_lengths():
    with pytest.raises(atpstar.InputError, match="same shape"):
        atpstar.PromptPairs(clean=[[1, 2, 3]], noise=[[1, 2]], answer=[4], distractor=[5])


def test_object_form_equals_verb(contract_model, contract_pairs, results):
    verb = atpstar.attribute(contract_model, contract_pairs, method="atp*", nodes=ALL)
    for t in ALL:
        assert torch.allclose(verb.per_pair[t], results["atp*"].per_pair[t], rtol=1e-12, atol=1e-14)
