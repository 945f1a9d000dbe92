"""A finished result is reused only on the model and pairs it was made with, in every verb and node space.

``fingerprint.check_reuse`` is the one check: verify, the false-negative bound, faithfulness curves
and ``find``'s given estimate all refuse another model's or other pairs' result, naming what differs.
"""

import pytest

import atpstar
from atpstar.errors import IdentityMismatchError
from reference.models import build_hf, load, make_pairs

NODES = [["edge"], ["head"]]


@pytest.fixture(scope="module")
def setting():
    model = load(build_hf("gpt2", n_layers=2, seed=0))
    twin = load(build_hf("gpt2", n_layers=2, seed=1))  # same shapes, other weights
    pairs = make_pairs(n_pairs=2, seq_len=5)
    other = make_pairs(n_pairs=2, seq_len=5, seed=7)
    return model, twin, pairs, other


@pytest.fixture(scope="module", params=NODES, ids=lambda nodes: nodes[0])
def estimate(request, setting):
    model, _, pairs, _ = setting
    return atpstar.attribute(model, pairs, method="atp", nodes=request.param)


def test_the_bound_refuses_a_verification_made_on_another_model(setting, estimate):
    model, twin, pairs, _ = setting
    checked = atpstar.verify(model, pairs, estimate, budget=2)
    with pytest.raises(IdentityMismatchError, match="verification does not match this run: model weights"):
        atpstar.false_negative_bound(twin, pairs, checked, samples=4)


def test_the_bound_refuses_a_verification_made_on_other_pairs(setting, estimate):
    model, _, pairs, other = setting
    checked = atpstar.verify(model, pairs, estimate, budget=2)
    with pytest.raises(IdentityMismatchError, match="prompt pairs"):
        atpstar.false_negative_bound(model, other, checked, samples=4)


def test_find_refuses_an_estimate_made_on_another_model(setting, estimate):
    model, twin, pairs, _ = setting
    with pytest.raises(IdentityMismatchError, match=r"estimate \(atp\) does not match this run: model weights"):
        atpstar.find(twin, pairs, 0.1, nodes=estimate.node_types, estimator=estimate, budget=50)


def test_find_refuses_an_estimate_made_on_other_pairs(setting, estimate):
    model, _, pairs, other = setting
    with pytest.raises(IdentityMismatchError, match="prompt pairs"):
        atpstar.find(model, other, 0.1, nodes=estimate.node_types, estimator=estimate, budget=50)


def test_a_faithfulness_curve_refuses_another_models_edge_estimate(setting):
    model, twin, pairs, _ = setting
    estimate = atpstar.attribute(model, pairs, method="atp", nodes=["edge"])
    with pytest.raises(IdentityMismatchError, match="model weights"):
        atpstar.faithfulness_curve(twin, pairs, estimate, fractions=[0.1, 0.5])


def test_a_faithfulness_curve_refuses_an_edge_estimate_of_other_pairs(setting):
    model, _, pairs, other = setting
    estimate = atpstar.attribute(model, pairs, method="atp", nodes=["edge"])
    with pytest.raises(IdentityMismatchError, match="prompt pairs"):
        atpstar.faithfulness_curve(model, other, estimate, fractions=[0.1, 0.5])


def test_a_faithfulness_curve_of_the_same_model_and_pairs_still_runs(setting):
    model, _, pairs, _ = setting
    estimate = atpstar.attribute(model, pairs, method="atp", nodes=["edge"])
    curve = atpstar.faithfulness_curve(model, pairs, estimate, fractions=[0.1, 0.5])
    assert len(curve.faithfulness) == 2
