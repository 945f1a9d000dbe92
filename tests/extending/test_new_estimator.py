"""A gradient estimator added in one file plus a registration line passes the method contract and
computes what it says, on nodes and edges."""

import pytest
import smooth_atp
import torch
from reference.models import build_hf, load, make_pairs

import atpstar
from atpstar.methods.base import METHODS, register
from atpstar.testing import check_method


@pytest.fixture
def registered():
    register("atp+smooth", summary="AtP with the gradient averaged over noisy copies of the base input")(
        smooth_atp.SmoothAtp
    )
    try:
        yield "atp+smooth"
    finally:
        METHODS.pop("atp+smooth")


def test_the_new_estimator_passes_the_method_contract(registered):
    check_method(registered)


def test_with_no_noise_it_is_atp_on_nodes_and_edges(registered):
    model, pairs = load(build_hf("llama", n_layers=2, seed=0)), make_pairs(n_pairs=2, seq_len=5)
    for nodes in (["neuron", "head"], ["edge"]):
        smooth = atpstar.attribute(model, pairs, method=registered, nodes=nodes, ig_steps=2, noise=0.0)
        plain = atpstar.attribute(model, pairs, method="atp", nodes=nodes)
        for t in nodes:
            torch.testing.assert_close(smooth.per_pair[t], plain.per_pair[t], rtol=1e-9, atol=1e-12)


def test_noise_changes_the_gradient_and_is_averaged(registered):
    """Two noisy points average the two single-point estimates (the points are drawn in order from one seed)."""
    model, pairs = load(build_hf("gpt2", n_layers=2, seed=0)), make_pairs(n_pairs=2, seq_len=5)
    both = atpstar.attribute(model, pairs, method=registered, nodes=["head"], ig_steps=2, noise=0.1, seed=3)
    plain = atpstar.attribute(model, pairs, method="atp", nodes=["head"])
    assert not torch.allclose(both.per_pair["head"], plain.per_pair["head"])
    assert both.cost.forward == 2 * 2 + 2 * 2 and both.cost.backward == 2 * 2
