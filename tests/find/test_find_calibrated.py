"""``atpstar.find`` with calibrated certificates, on a strong-interaction toy (2-layer hidden-32 Llama with saturated
attention): certified only after calibration passes, every certified run finds every node with |c| >= θ (exhaustive
truth), calibration cost counted, and the search never spends past exhaustive patching plus the estimate."""

from __future__ import annotations

import pytest
import torch

import atpstar
from atpstar.bound.calibration import calibrate as real_calibrate
from atpstar.find import calibrate as find_calibrate
from atpstar.testing.fixtures import tiny_model, tiny_pairs

FIVE = ["neuron", "query", "key", "value", "head"]


def _saturated(scale: float) -> atpstar.Model:
    model = tiny_model(8, n_layers=2)
    with torch.no_grad():
        for layer in model.hf_model.model.layers:
            layer.self_attn.q_proj.weight.mul_(scale)
    return model


def _hide_largest(estimate: atpstar.Attribution, truth: atpstar.Attribution) -> atpstar.Attribution:
    """The estimate with the truth's largest node scored 0 (ranked last): only the bound can catch it."""
    t = max(FIVE, key=lambda name: float(truth.scores[name].abs().max()))
    where = tuple(int(i) for i in torch.nonzero(truth.scores[t].abs() == truth.scores[t].abs().max())[0])
    per_pair = {k: v.clone() for k, v in estimate.per_pair.items()}
    scores = {k: v.clone() for k, v in estimate.scores.items()}
    per_pair[t][(slice(None), *where)] = 0.0
    scores[t][where] = 0.0
    return atpstar.Attribution(
        estimate.method,
        estimate.options,
        estimate.direction,
        estimate.metric,
        estimate.model_id,
        per_pair,
        scores,
        estimate.aggregation,
        estimate.cost,
    )


@pytest.fixture(scope="module")
def strong():
    model, pairs = _saturated(6.0), tiny_pairs(1, 16, seed=9)  # 1,408 nodes
    truth = atpstar.attribute(model, pairs, "activation_patching", FIVE)
    estimate = _hide_largest(atpstar.attribute(model, pairs, "atp*", FIVE), truth)
    theta = 0.5 * max(float(truth.scores[t].abs().max()) for t in FIVE)
    large = {(t, tuple(int(i) for i in ix)) for t in FIVE for ix in torch.nonzero(truth.scores[t].abs() >= theta)}
    return model, pairs, truth, estimate, theta, large


def _within_ceiling(found) -> None:
    """The estimate + (1 + max_overspend) x exhaustive patching, never passed; without a budget always certified."""
    ceiling = found.info["left"]["cost_ceiling"]
    estimate = found.cost["estimate"].forward_equivalents
    assert ceiling == pytest.approx(estimate + (1 + found.info["max_overspend"]) * found.exhaustive_cost)
    assert found.total_cost.forward_equivalents <= ceiling + 1e-9
    assert found.certified and found.certified_by in ("bound", "exhaustion")


def test_certified_only_after_calibration_and_never_missing_a_large_node(strong):
    model, pairs, truth, estimate, theta, large = strong
    through_bound = 0
    for seed in range(3):
        # One bound costs ~60 % of exhaustive patching here: allow the gamble, to test the calibration behind it.
        found = atpstar.find(model, pairs, theta, nodes=FIVE, estimator=estimate, seed=seed, max_overspend=1.0)
        _within_ceiling(found)
        if not found.certified:
            continue
        assert large <= set(found.nodes), seed
        if found.bound is not None and found.bound.n_unverified > 0:
            through_bound += 1
            calibration = found.certificate()["calibration"]
            assert calibration["passed"] and calibration["checked"] > 0 and calibration["level"] >= 1 - found.alpha
            assert found.bound.max_effect_upper < theta and "Calibrated" in found.bound.assumption
            assert found.cost["calibrate"].forward_equivalents > 0  # counted in the total
            assert "calibrate" in found.verified.info["stage"]
            assert "widened by" in found.statement()
    assert through_bound >= 1


def test_a_refused_calibration_never_certifies_through_the_bound(strong, monkeypatch):
    model, pairs, truth, estimate, theta, large = strong

    def refuse(*args, **kwargs):
        verdict = real_calibrate(*args, **kwargs)
        return verdict.__class__(**{**verdict.__dict__, "passed": False, "reason": "refused by the test"})

    monkeypatch.setattr(find_calibrate, "calibrate", refuse)
    found = atpstar.find(model, pairs, theta, nodes=FIVE, estimator=estimate, seed=0, max_rounds=3, max_overspend=1.0)
    assert not found.certified or found.bound.n_unverified == 0  # only exhaustive verification may certify
    rows = [row for row in found.history if row["stage"] == "calibrate"]
    assert rows and all(not row["certified"] for row in rows)
    assert found.cost["calibrate"].forward_equivalents > 0
    _within_ceiling(found)


def test_cost_never_passes_exhaustive_patching_when_the_bound_cannot_pay():
    """θ far below every effect: no bound can rule anything out, so the search ends exhaustive (or at its ceiling)."""
    model, pairs = _saturated(1.0), tiny_pairs(1, 16, seed=9)
    truth = atpstar.attribute(model, pairs, "activation_patching", FIVE)
    for theta in (0.001, 0.05):
        found = atpstar.find(model, pairs, theta, nodes=FIVE, estimator="atp*", seed=0)
        _within_ceiling(found)
        assert (
            found.total_cost.forward_equivalents
            <= truth.cost.forward_equivalents * 1.05 + found.cost["estimate"].forward_equivalents
        )
