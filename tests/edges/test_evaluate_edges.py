"""``atpstar.evaluate`` on edges: exact edge patching is the truth, edge estimators are ranked by the cost of
verified recall in forward passes, checked against a hand count of verifications."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import atpstar
from atpstar.edges.graph import graph_of
from reference.models import build_hf, load, make_pairs


@pytest.fixture(scope="module")
def runs():
    model = load(build_hf("llama", n_layers=2, seed=3))
    pairs = make_pairs(n_pairs=2, seq_len=6, seed=4)
    truth = atpstar.attribute(model, pairs, method="activation_patching", nodes=["edge"])
    eap = atpstar.attribute(model, pairs, method="atp", nodes=["edge"])
    return model, pairs, truth, eap


def _reversed(estimate):
    """The same estimator with its ranking turned upside down (a worse estimator at the same cost)."""
    flipped = {t: 1.0 / (v.abs() + 1e-30) for t, v in estimate.per_pair.items()}
    return dataclasses.replace(estimate, per_pair=flipped, scores={t: v.mean(0) for t, v in flipped.items()})


def _hand_cost(true_abs, estimate_abs, own, k, per_verification):
    """Walk the estimate's order until every one of the true top-k has been verified."""
    order = sorted(range(len(estimate_abs)), key=lambda i: (-float(estimate_abs[i]), i))
    wanted = set(sorted(range(len(true_abs)), key=lambda i: (-float(true_abs[i]), i))[:k])
    spent = own
    for node in order:
        spent += per_verification
        wanted.discard(node)
        if not wanted:
            return spent
    raise AssertionError("never found")


def test_exact_edge_patching_as_estimate_is_the_oracle(runs):
    _, pairs, truth, _ = runs
    ev = atpstar.evaluate(truth, {"exact": truth}, node_types=["edge"])
    curve = ev.curves["exact"]
    assert np.all(curve.recall == 1.0)
    own = truth.cost.forward_equivalents
    np.testing.assert_allclose(curve.cost, own + ev.k * pairs.n_pairs)
    np.testing.assert_allclose(curve.verifications(), ev.oracle_cost())


def test_edge_costs_match_a_hand_count(runs):
    _, pairs, truth, eap = runs
    worse = _reversed(eap)
    ev = atpstar.evaluate(truth, {"eap": eap, "reversed": worse}, node_types=["edge"])
    assert ev.n_nodes == truth.scores["edge"].numel()
    true_abs = truth.scores["edge"].abs()
    for label, est in (("eap", eap), ("reversed", worse)):
        own = est.cost.forward_equivalents
        for k in (1, 5, ev.k_max):
            want = _hand_cost(true_abs, est.scores["edge"].abs(), own, k, pairs.n_pairs)
            assert ev.curves[label].cost[k - 1] == pytest.approx(want)
    # Same own cost; the reversed ranking needs more verifications.
    assert ev.curves["reversed"].cost[0] > ev.curves["eap"].cost[0]
    assert ev.relative_cost("reversed") > ev.relative_cost("eap")


def test_per_pair_setting_on_edges(runs):
    _, pairs, truth, eap = runs
    ev = atpstar.evaluate(truth, [eap], setting="per_pair", node_types=["edge"])
    costs = []
    for p in range(pairs.n_pairs):
        own = eap.cost.forward_equivalents / pairs.n_pairs
        costs.append(_hand_cost(truth.per_pair["edge"][p].abs(), eap.per_pair["edge"][p].abs(), own, 3, 1))
    assert ev.curves["atp"].cost[2] == pytest.approx(float(np.exp(np.mean(np.log(costs)))))


def test_partial_verification_charges_the_sweeps_own_cost(runs):
    model, pairs, truth, eap = runs
    graph = graph_of(model)
    share = graph.patch_share()
    logits = graph.receiver_index == graph.logits_receiver
    # The sweep's real count: 2P base/source forwards, then per pair every edge at its share (logits: free).
    assert truth.cost.forward == pytest.approx(pairs.n_pairs * (2 + float(share[~logits].sum())))
    ev = atpstar.evaluate(truth, [eap], node_types=["edge"], verification="partial")
    order = torch.sort(eap.scores["edge"].abs().double(), descending=True, stable=True).indices
    true_top = set(torch.sort(truth.scores["edge"].abs().double(), descending=True, stable=True).indices[:4].tolist())
    last = max(int((order == t).nonzero()) for t in true_top)
    want = eap.cost.forward_equivalents + pairs.n_pairs * float(share[order[: last + 1]].sum())
    assert ev.curves["atp"].cost[3] == pytest.approx(want)


def test_edges_and_nodes_in_one_comparison(runs):
    model, pairs, _, _ = runs
    truth = atpstar.attribute(model, pairs, method="activation_patching", nodes=["head", "edge"])
    est = atpstar.attribute(model, pairs, method="atp", nodes=["head", "edge"])
    ev = atpstar.evaluate(truth, [est])
    assert ev.node_types == ["head", "edge"]
    assert ev.n_nodes == truth.scores["head"].numel() + truth.scores["edge"].numel()


def test_mismatched_edge_results_are_refused(runs):
    model, pairs, truth, _ = runs
    other = atpstar.attribute(model, make_pairs(n_pairs=3, seq_len=6, seed=9), method="atp", nodes=["edge"])
    with pytest.raises(atpstar.AtpstarError):
        atpstar.evaluate(truth, [other], node_types=["edge"])
