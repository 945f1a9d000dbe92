"""Cost of verified recall against hand-computed examples and a naive loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atpstar import AtpstarError, Attribution, Cost
from atpstar.evaluate import Evaluation, evaluate, verified_recall_cost


def _attr(method: str, per_pair: torch.Tensor, cost: Cost, aggregation: str = "mean") -> Attribution:
    """An Attribution over 'head' nodes with layout [L=1, H=2, T=3] (6 nodes) per pair."""
    per_pair = per_pair.reshape(per_pair.shape[0], 1, 2, 3).double()
    scores = per_pair.mean(0) if aggregation == "mean" else per_pair.abs().mean(0)
    return Attribution(method, {}, "noising", "logit_diff", "tiny", {"head": per_pair}, {"head": scores},
                       aggregation, cost)


def test_hand_computed_six_nodes() -> None:
    # True |effect| order: nodes 0 > 1 > 2 > 3 > 4 > 5.
    truth = torch.tensor([6.0, 5, 4, 3, 2, 1])
    # Estimate order: 1, 0, 5, 2, 4, 3  ->  rank of true nodes 0..5 = [1, 0, 3, 5, 4, 2].
    estimate = torch.tensor([5.0, 6, 3, 0.5, 1, 4])
    cost, recall = verified_recall_cost(truth, estimate, own_cost=10.0, k_max=6)
    # K=1: node 0 at rank 1 -> 2 verifications; K=2: max(1,0)+1 = 2; K=3: node 2 at rank 3 -> 4;
    # K=4: node 3 at rank 5 -> 6; then 6.
    assert cost.tolist() == [12.0, 12.0, 14.0, 16.0, 16.0, 16.0]
    # Recall@K: est top-K vs true top-K. K=1 {1} vs {0}: 0; K=2 {1,0}: 1; K=3 {1,0,5} vs {0,1,2}: 2/3;
    # K=4 {1,0,5,2} vs {0,1,2,3}: 3/4; K=5 {1,0,5,2,4} vs {0..4}: 4/5; K=6: 1.
    np.testing.assert_allclose(recall, [0, 1, 2 / 3, 3 / 4, 4 / 5, 1])


def test_oracle_costs_k_and_matches_naive_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    truth = torch.randn(500, generator=gen)
    cost, recall = verified_recall_cost(truth.abs(), truth.abs(), 0.0, 100)
    assert cost.tolist() == list(range(1, 101))
    assert np.all(recall == 1)
    estimate = truth + 0.5 * torch.randn(500, generator=gen)
    cost, recall = verified_recall_cost(truth.abs(), estimate.abs(), 3.0, 100)
    method_order = torch.sort(estimate.abs(), descending=True, stable=True).indices.tolist()
    true_order = torch.sort(truth.abs(), descending=True, stable=True).indices.tolist()
    for k in (1, 7, 50, 100):
        needed = set(true_order[:k])
        verified = next(i + 1 for i in range(500) if needed <= set(method_order[: i + 1]))
        assert cost[k - 1] == 3.0 + verified
        assert recall[k - 1] == pytest.approx(len(needed & set(method_order[:k])) / k)


def test_evaluate_settings_and_round_trip(tmp_path) -> None:
    truth_pp = torch.tensor([[6.0, -5, 4, 3, 2, 1], [1.0, 2, 3, 4, 5, 6]])
    truth = _attr("activation_patching", truth_pp, Cost(forward=20))
    good = _attr("atp", truth_pp.abs() + 0.01, Cost(forward=4, backward=2), "mean_abs")  # perfect ranking
    same = _attr("blocks", -truth_pp.abs(), Cost(forward=2), "mean_abs")  # sign ignored: perfect ranking
    worst = _attr("subsampling", 1.0 / truth_pp.abs(), Cost(forward=2), "mean_abs")  # reversed ranking
    ev = evaluate(truth, [good, same, worst], setting="per_pair", k_max=3)
    # atp own cost per pair = (4 + 2*2) / 2 = 4; oracle ranking -> cost K + 4.
    np.testing.assert_allclose(ev.curves["atp"].cost, [5, 6, 7])
    # Reversed ranking: the true top-1 is verified last of 6 -> 6 + own 1.
    np.testing.assert_allclose(ev.curves["subsampling"].cost, [7, 7, 7])
    assert ev.curves["subsampling"].recall.tolist() == [0, 0, 0]
    assert ev.ranking()[0] in ("blocks", "atp") and ev.ranking()[-1] == "subsampling"
    dist = evaluate(truth, {"atp": good}, setting="distribution")
    # Distribution truth = mean signed: [3.5, -1.5, 3.5, 3.5, 3.5, 3.5] -> 5 non-zero... k_max = 6.
    assert dist.k_max == 6 and dist.curves["atp"].cost_min is None
    md = ev.to_markdown()
    assert "| method |" in md and "subsampling" in md and "cost@1" in md
    ev.save(tmp_path / "ev")
    loaded = Evaluation.load(tmp_path / "ev.json")
    np.testing.assert_allclose(loaded.curves["subsampling"].cost_max, ev.curves["subsampling"].cost_max)
    assert loaded.to_rows() == ev.to_rows()
    ev.to_csv(tmp_path / "ev.csv")
    assert (tmp_path / "ev.csv").read_text().startswith("method,")


def test_zero_effects_cap_k_and_errors() -> None:
    truth = _attr("activation_patching", torch.tensor([[3.0, 0, 0, 1, 0, 0]]), Cost(forward=6))
    est = _attr("atp", torch.tensor([[1.0, 2, 3, 4, 5, 6]]), Cost(forward=2), "mean_abs")
    assert evaluate(truth, [est]).k_max == 2
    with pytest.raises(AtpstarError, match="activation_patching"):
        evaluate(est, [est])
    with pytest.raises(AtpstarError, match="setting"):
        evaluate(truth, [est], setting="single")
    other = _attr("atp", torch.ones(2, 6), Cost(), "mean_abs")
    with pytest.raises(AtpstarError, match="pairs"):
        evaluate(truth, [other])


def test_partial_ground_truth_is_refused() -> None:
    per_pair = torch.arange(12.0).reshape(2, 6)
    truth = _attr("activation_patching", per_pair, Cost(10.0))
    truth.info["layers"] = []  # as if no layer of the one-layer layout had been patched
    estimate = _attr("atp", per_pair.flip(1), Cost(2.0), "mean_abs")
    with pytest.raises(AtpstarError, match="covers only layers"):
        evaluate(truth, [estimate])
    truth.info["layers"] = [0]
    evaluate(truth, [estimate])


def test_one_unit_per_setting_hand_computed() -> None:
    """Verifying a node over the distribution patches it on every pair: P forwards."""

    def two_layers(method: str, values: list[float], cost: Cost, aggregation: str) -> Attribution:
        per_pair = torch.tensor([values, values]).reshape(2, 2, 1, 3).double()  # P=2, layout [L=2, H=1, T=3]
        scores = per_pair.mean(0) if aggregation == "mean" else per_pair.abs().mean(0)
        return Attribution(method, {}, "noising", "logit_diff", "tiny", {"head": per_pair}, {"head": scores},
                           aggregation, cost)

    # Nodes n0..n2 at layer 0, n3..n5 at layer 1; true |effect| n0 > n1 > ... > n5.
    truth = two_layers("activation_patching", [32.0, 16, 8, 4, 2, 1], Cost(forward=100), "mean")
    # Estimate order n1, n0, n2, n3, n4, n5; own cost 4 forwards + 1 backward = 6 forward equivalents (both pairs).
    estimate = two_layers("atp", [5.0, 6, 4, 3, 2, 1], Cost(forward=4, backward=1), "mean_abs")
    # Distribution: own 6 (both pairs) + 2 forwards per verified node; true top-K needs [2,2,3,4,5,6] nodes.
    dist = evaluate(truth, [estimate], setting="distribution", k_max=6)
    np.testing.assert_allclose(dist.curves["atp"].cost, [10, 10, 12, 14, 16, 18])
    np.testing.assert_allclose(dist.oracle_cost(), [2, 4, 6, 8, 10, 12])
    assert dist.curves["atp"].own_cost == 6
    # Per pair: own 6 / 2 = 3 + 1 forward per verified node; oracle K.
    per = evaluate(truth, [estimate], setting="per_pair", k_max=6)
    np.testing.assert_allclose(per.curves["atp"].cost, [5, 5, 6, 7, 8, 9])
    np.testing.assert_allclose(per.oracle_cost(), [1, 2, 3, 4, 5, 6])
    # Engine cost: a patched forward from layer 1 of 2 costs 1/2; per node over 2 pairs: [2, 2, 2, 1, 1, 1].
    partial = evaluate(truth, [estimate], setting="distribution", k_max=6, verification="partial")
    np.testing.assert_allclose(partial.curves["atp"].cost, [10, 10, 12, 13, 14, 15])
    np.testing.assert_allclose(partial.oracle_cost(), [2, 4, 6, 7, 8, 9])
    # cost/oracle: geometric mean over K in {1..6} (log-spaced, rounded) of cost / oracle.
    ks = np.unique(np.round(np.logspace(0, np.log10(6), 25)).astype(int))
    expected = np.exp(np.mean(np.log(np.array([10, 10, 12, 14, 16, 18])[ks - 1] / (2 * ks))))
    assert dist.relative_cost("atp") == pytest.approx(expected)
    with pytest.raises(AtpstarError, match="verification unit"):
        evaluate(truth, [estimate], verification="backward")
