"""The contract every registered method meets (``atpstar.testing``), run over ``atpstar.METHODS``, including
methods added later.

Only the common API is used: ``METHODS[id]()`` with default options and ``.attribute(model, pairs, nodes)``.
"""

from __future__ import annotations

import pytest
import torch

import atpstar
from atpstar.nodes import node_shape
from atpstar.testing import CHECKS, check_method, contract
from reference.models import build_hf, load, make_pairs

ALL = ["neuron", "query", "key", "value", "head"]
METHOD_IDS = sorted(atpstar.METHODS)


@pytest.fixture(scope="module")
def contract_model():
    return load(build_hf("llama", seed=8))


@pytest.fixture(scope="module")
def contract_pairs():
    return make_pairs(n_pairs=3, seq_len=5, seed=9)


@pytest.fixture(scope="module")
def contracts(contract_model, contract_pairs):
    """One ``atpstar.testing.Contract`` per method: its result is computed once and shared by the checks."""
    return {m: contract(m, contract_model, contract_pairs) for m in METHOD_IDS}


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("method_id", METHOD_IDS)
def test_contract(method_id, check, contracts):
    """The checks ``atpstar.testing.check_method`` runs, one test each, on every registered method."""
    CHECKS[check](contracts[method_id])


def test_core_methods_registered():
    for method_id in ("activation_patching", "atp", "atp+qkfix", "atp+graddrop", "atp*"):
        assert method_id in atpstar.METHODS
    assert atpstar.METHODS["activation_patching"].cls.exact
    assert all(atpstar.METHODS[m].cls.needs_gradients for m in ("atp", "atp+qkfix", "atp+graddrop", "atp*"))


def test_layouts_are_the_documented_ones(contract_model):
    s = contract_model
    assert node_shape("neuron", s.sizes, 5) == (s.n_layers, 5, s.d_mlp)
    assert node_shape("query", s.sizes, 5) == (s.n_layers, s.n_heads, 5)
    assert node_shape("head", s.sizes, 5) == (s.n_layers, s.n_heads, 5)
    assert node_shape("key", s.sizes, 5) == (s.n_layers, s.n_kv_heads, 5) == node_shape("value", s.sizes, 5)


def documented_cost(method_id, model, pairs, node_types):
    """(forward, backward) passes over single prompts, as the method docstrings state them (written out
    independently of ``expected_cost``, which ``check_cost`` compares with the reported cost)."""
    n_pairs, n_layers, seq = pairs.n_pairs, model.n_layers, pairs.seq_len
    if method_id == "activation_patching":
        forward = 2 * n_pairs
        for t in node_types:
            per_layer = node_shape(t, model.sizes, seq)[1] * node_shape(t, model.sizes, seq)[2]
            forward += sum(n_pairs * per_layer * (n_layers - layer) / n_layers for layer in range(n_layers))
        return forward, 0.0
    backward = n_pairs
    if method_id in ("atp+graddrop", "atp*"):
        backward += sum(n_pairs * layer / n_layers for layer in range(1, n_layers))
    return 2 * n_pairs, backward


@pytest.mark.parametrize("method_id", ["activation_patching", "atp", "atp+qkfix", "atp+graddrop", "atp*"])
def test_declared_cost_is_the_documented_count(method_id, contracts, contract_model, contract_pairs):
    c = contracts[method_id]
    declared = c.build().expected_cost(contract_model, contract_pairs, c.node_types, c.result.info)
    forward, backward = documented_cost(method_id, contract_model, contract_pairs, c.node_types)
    assert declared.forward == pytest.approx(forward, rel=1e-12)
    assert declared.backward == pytest.approx(backward, rel=1e-12, abs=1e-12)


def test_check_method_catches_a_broken_method(contract_model, contract_pairs):
    """A toy estimator that under-reports its cost and ignores the pair axis fails, naming the check."""

    class Broken(atpstar.methods.Method):
        summary = "returns the same random scores for every pair"

        def expected_cost(self, model, pairs, node_types, info):
            return atpstar.Cost(forward=1.0)

        def _attribute(self, model, pairs, node_types, direction, cost, progress):
            cost.add_forward(2 * pairs.n_pairs)
            shapes = {t: node_shape(t, model.sizes, pairs.seq_len) for t in node_types}
            return {t: torch.ones(pairs.n_pairs, *shape) for t, shape in shapes.items()}, {}, {}

    with pytest.raises(AssertionError, match="cost"):
        check_method(Broken, model=contract_model, pairs=contract_pairs)


def test_check_method_passes_a_toy_estimator_on_the_default_model():
    """The public entry point, on its own tiny model: a zero estimator that declares its cost."""

    class Zero(atpstar.methods.Method):
        summary = "scores every node 0 after running each prompt once"
        node_types = ("head",)

        def expected_cost(self, model, pairs, node_types, info):
            return atpstar.Cost(forward=2 * pairs.n_pairs)

        def _attribute(self, model, pairs, node_types, direction, cost, progress):
            pairs.evaluate_metric(model.logits(pairs.clean)[:, -1], torch.arange(pairs.n_pairs))  # shape check
            cost.add_forward(2 * pairs.n_pairs)
            layout = node_shape("head", model.sizes, pairs.seq_len)
            return {"head": torch.zeros(pairs.n_pairs, *layout, dtype=model.dtype)}, {}, {}

    check_method(Zero)


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


def test_object_form_equals_verb(contract_model, contract_pairs, contracts):
    verb = atpstar.attribute(contract_model, contract_pairs, method="atp*", nodes=ALL)
    for t in ALL:
        assert torch.allclose(verb.per_pair[t], contracts["atp*"].result.per_pair[t], rtol=1e-12, atol=1e-14)
