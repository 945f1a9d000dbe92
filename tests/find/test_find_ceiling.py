"""``find``'s cost ceiling: bounds are gambles taken only while, should they fail, verifying the rest still fits the
estimate + (1 + max_overspend) x exhaustive patching; when none fits, the rest is verified exactly and the result is
certified by exhaustion. Only the user's budget ends a search uncertified."""

from __future__ import annotations

import pytest
import torch

import atpstar
from atpstar.testing.fixtures import tiny_model, tiny_pairs

FIVE = ["neuron", "query", "key", "value", "head"]


@pytest.fixture(scope="module")
def setting():
    model = tiny_model(8, n_layers=2)  # 2-layer hidden-32 Llama: 1,408 nodes, where one bound costs ~60 % of exhaustive
    pairs = tiny_pairs(1, 16, seed=9)
    truth = atpstar.attribute(model, pairs, "activation_patching", FIVE)
    estimate = atpstar.attribute(model, pairs, "atp*", FIVE)
    theta = 0.5 * max(float(truth.scores[t].abs().max()) for t in FIVE)
    large = {(t, tuple(int(i) for i in ix)) for t in FIVE for ix in torch.nonzero(truth.scores[t].abs() >= theta)}
    return model, pairs, truth, estimate, theta, large


def _cost(found) -> float:
    return found.total_cost.forward_equivalents


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_without_a_budget_find_always_certifies_within_the_overspend(setting, seed):
    """The calibrated toy where the strict ceiling (exhaustive + estimate) left every run uncertified."""
    model, pairs, truth, estimate, theta, large = setting
    found = atpstar.find(model, pairs, theta, nodes=FIVE, estimator=estimate, seed=seed)
    exhaustive = truth.cost.forward_equivalents
    assert found.exhaustive_cost == pytest.approx(exhaustive)
    assert found.certified and large <= set(found.nodes)
    assert _cost(found) <= found.cost["estimate"].forward_equivalents + 1.1 * exhaustive + 1e-9
    certificate = found.certificate()
    assert certificate["certified_by"] in ("bound", "exhaustion")
    if certificate["certified_by"] == "exhaustion":
        assert found.bound.n_unverified == 0 and "certified by exhaustion" in found.statement()
        assert certificate["finish"] or certificate["fallback"]


def test_no_overspend_means_exhaustive_cost_at_most(setting):
    model, pairs, truth, estimate, theta, large = setting
    found = atpstar.find(model, pairs, theta, nodes=FIVE, estimator=estimate, max_overspend=0.0)
    assert found.certified and found.certified_by == "exhaustion" and large <= set(found.nodes)
    assert "bound" not in found.cost  # no gamble fits a zero allowance
    assert _cost(found) <= found.cost["estimate"].forward_equivalents + truth.cost.forward_equivalents + 1e-9


def test_a_larger_overspend_lets_more_gambles_run(setting):
    model, pairs, truth, estimate, theta, large = setting
    found = atpstar.find(model, pairs, theta, nodes=FIVE, estimator=estimate, max_overspend=1.0)
    assert found.certified and large <= set(found.nodes)
    assert found.cost["bound"].forward_equivalents > 0
    assert _cost(found) <= found.cost["estimate"].forward_equivalents + 2.0 * truth.cost.forward_equivalents + 1e-9


def test_the_budget_is_a_hard_ceiling_and_the_only_way_to_end_uncertified(setting):
    model, pairs, truth, estimate, theta, large = setting
    budget = 0.5 * truth.cost.forward_equivalents
    found = atpstar.find(model, pairs, theta, nodes=FIVE, estimator=estimate, budget=budget)
    assert _cost(found) <= budget + 1e-9
    if not found.certified:
        assert "budget" in found.certificate()["stopped"] and found.certificate()["certified_by"] is None
        assert found.statement().startswith("NOT certified")


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1"])
def test_max_overspend_is_checked_before_any_pass(setting, bad):
    model, pairs, truth, estimate, theta, large = setting
    with pytest.raises(atpstar.InputError, match="max_overspend"):
        atpstar.find(model, pairs, theta, nodes=FIVE, estimator=estimate, max_overspend=bad)
