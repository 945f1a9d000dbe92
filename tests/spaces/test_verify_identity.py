"""Every node space goes through the same checks before any pass: identity, layout, memory plans."""

import pytest
import torch

import atpstar
from atpstar.errors import IdentityMismatchError, InputError
from reference.models import build_hf, load, make_pairs


@pytest.fixture(scope="module")
def setting():
    model = load(build_hf("gpt2", n_layers=2, seed=0))
    twin = load(build_hf("gpt2", n_layers=2, seed=1))  # same shapes, other weights
    pairs = make_pairs(n_pairs=2, seq_len=5)
    estimate = atpstar.attribute(model, pairs, method="atp", nodes=["edge"])
    return model, twin, pairs, estimate


def test_verifying_an_edge_estimate_on_another_model_is_refused(setting):
    model, twin, pairs, estimate = setting
    with pytest.raises(IdentityMismatchError, match="weights"):
        atpstar.verify(twin, pairs, estimate, budget=3)


def test_verifying_an_edge_estimate_on_other_pairs_is_refused(setting):
    model, twin, pairs, estimate = setting
    other = make_pairs(n_pairs=2, seq_len=5, seed=7)
    with pytest.raises(IdentityMismatchError, match="pairs"):
        atpstar.verify(model, other, estimate, budget=3)


def test_an_edge_estimate_verifies_like_exact_edge_patching(setting):
    model, _, pairs, estimate = setting
    checked = atpstar.verify(model, pairs, estimate, budget=4)
    truth = atpstar.attribute(model, pairs, method="activation_patching", nodes=["edge"])
    edges = torch.tensor([index[0] for _, index in checked.nodes])
    torch.testing.assert_close(checked.effects, truth.per_pair["edge"][:, edges].T.double(), rtol=1e-10, atol=1e-12)
    assert checked.names == [estimate.spaces().name("edge", index) for _, index in checked.nodes]


def test_predicting_memory_for_edges_is_a_clear_error(setting):
    model = setting[0]
    with pytest.raises(InputError, match="no memory model"):
        atpstar.predict_memory(model, n_pairs=2, seq_len=5, method="atp", nodes=["edge"])
