"""Calibration of the false-negative bound (``bound.calibration``): the statistics alone, then a strong-interaction
toy where the per-node bound misses the largest unverified node at 95 % and the calibrated bound does not."""

from __future__ import annotations

import math

import pytest
import torch

import atpstar
from atpstar.bound import false_negative_bound
from atpstar.bound.calibration import (
    CALIBRATION_RANDOM,
    CALIBRATION_TOP,
    binomial_quantile,
    calibrate,
    calibration_sample,
    next_p,
    shrinkage,
)
from atpstar.cost import Cost
from atpstar.job import Job
from atpstar.spaces import Spaces, spaces_for
from atpstar.testing.fixtures import tiny_model, tiny_pairs
from atpstar.verify import patch_nodes, verify

FIVE = ["neuron", "query", "key", "value", "head"]


def test_binomial_quantile_equals_the_cumulative_sum():
    for n, prob, level in [(32, 0.0125, 0.9875), (10, 0.3, 0.5), (5, 0.5, 0.99), (1, 0.1, 0.95)]:
        pmf = [math.comb(n, k) * prob**k * (1 - prob) ** (n - k) for k in range(n + 1)]
        want = next(k for k in range(n + 1) if sum(pmf[: k + 1]) >= level)
        assert binomial_quantile(n, prob, level) == want


def test_shrinkage_lower_bound_holds_at_its_level():
    """ĉ = s c + noise(se): ŝ is unbiased and its (1 - α) lower bound lies above the true s in about α of draws."""
    g = torch.Generator().manual_seed(0)
    exact = torch.linspace(-2, 2, 40, dtype=torch.float64)
    se = torch.full_like(exact, 0.1)
    true_s, alpha, above, slopes = 0.7, 0.05, 0, []
    for _ in range(400):
        noisy = true_s * exact + se * torch.randn(40, generator=g, dtype=torch.float64)
        found = shrinkage(exact, noisy, se, alpha)
        slopes.append(found.estimate)
        above += found.lower > true_s
        assert found.n_signal == int((exact.abs() >= 3 * se).sum())
    assert abs(sum(slopes) / len(slopes) - true_s) < 0.005
    assert above / 400 <= alpha + 0.03
    empty = shrinkage(exact * 0, exact * 0, se, alpha)  # nothing carries signal: unmeasured, no widening
    assert math.isnan(empty.estimate) and empty.lower == 1.0 and empty.n_signal == 0


def test_calibration_passes_widens_and_refuses_for_the_right_reasons():
    exact = torch.tensor([0.5, 0.2, -0.1, 0.0], dtype=torch.float64)
    se = torch.full_like(exact, 0.01)
    checked = {"exact": exact, "estimate": exact.clone(), "se": se, "upper": exact.abs() + 2.3 * se}
    ok = calibrate(checked, 1, 0.3, theta=0.6, alpha=0.025, alpha_bound=0.025)
    assert ok.passed and 1.0 <= ok.widen < 1.05 and ok.outside == 0 and ok.reason == ""  # s_lo < 1: sampling
    assert ok.level == pytest.approx(0.95) and ok.max_upper == pytest.approx(0.3 * ok.widen)
    shrunk = {**checked, "estimate": 0.7 * exact, "upper": 0.7 * exact.abs() + 2.3 * se}
    widened = calibrate(shrunk, 1, 0.3, theta=0.6, alpha=0.025, alpha_bound=0.025)
    assert 1 / 0.7 < widened.widen < 1.6 and widened.max_upper == pytest.approx(0.3 * widened.widen)
    assert widened.passed and widened.worst_ratio > 1  # the raw intervals missed, the widened ones do not
    assert not calibrate(shrunk, 1, 0.45, theta=0.6, alpha=0.025, alpha_bound=0.025).passed  # widened past θ
    large = calibrate(checked, 1, 0.3, theta=0.4, alpha=0.025, alpha_bound=0.025)
    assert not large.passed and large.large == 1 and "ruled them out" in large.reason
    flipped = {**checked, "estimate": -exact, "upper": exact.abs() + 2.3 * se}  # joint patches reverse effects
    assert not calibrate(flipped, 1, 0.3, theta=0.6, alpha=0.025, alpha_bound=0.025).passed


def test_calibration_sample_takes_the_top_then_every_stratum():
    n = 200
    upper = torch.arange(n, dtype=torch.float64)
    estimate = torch.linspace(-1, 1, n, dtype=torch.float64)
    keep = torch.ones(n, dtype=torch.bool)
    keep[-3:] = False  # verified nodes are never checked
    sample, top = calibration_sample(upper, estimate, keep, 0, CALIBRATION_TOP, CALIBRATION_RANDOM)
    assert top == CALIBRATION_TOP and len(sample) == CALIBRATION_TOP + CALIBRATION_RANDOM
    assert sample[:top].tolist() == list(range(n - 4, n - 4 - top, -1))
    assert len(set(sample.tolist())) == len(sample) and bool(keep[sample].all())
    strata = (estimate[sample[top:]].abs() * 4).floor().clamp(max=3)  # |ĉ| quartiles of a uniform grid
    assert len(torch.unique(strata)) >= 3
    again, _ = calibration_sample(upper, estimate, keep, 0, CALIBRATION_TOP, CALIBRATION_RANDOM)
    assert torch.equal(sample, again)
    few, top_few = calibration_sample(upper[:5], estimate[:5], keep[:5], 0, CALIBRATION_TOP, CALIBRATION_RANDOM)
    assert top_few == 5 and len(few) == 5


def test_next_p_lowers_p_with_the_measured_shrinkage():
    assert next_p(0.05, 0.98, 1e-4) == 0.05  # within the target: unchanged
    assert next_p(0.05, float("nan"), 1e-4) == 0.05  # unmeasured: unchanged
    assert next_p(0.05, 0.8, 1e-4) == pytest.approx(0.05 * 0.05 / 0.2)
    assert next_p(0.05, 0.0, 1e-4) == pytest.approx(0.05 / 8)  # at most 8x lower at once
    assert next_p(0.05, 0.0, 0.02) == 0.02  # never below the floor


def saturated(scale: float = 6.0) -> atpstar.Model:
    """The 2-layer hidden-32 Llama of the fixtures with its queries scaled (saturated attention)."""
    model = tiny_model(8, n_layers=2)
    with torch.no_grad():
        for layer in model.hf_model.model.layers:
            layer.self_attn.q_proj.weight.mul_(scale)
    return model


def test_calibrated_bound_covers_what_the_per_node_bound_misses_on_strong_interactions():
    """AtP*'s top 12 verified, the bound over the rest (300 samples, p 0.05): on this saturated toy joint patches
    shrink the largest unverified effect by about a third, so the per-node 95 % bound misses it in most seeds.
    Calibration (checked nodes exactly patched on the shared path) covers it in every seed."""
    model, pairs = saturated(), tiny_pairs(2, 5)
    truth = atpstar.attribute(model, pairs, "activation_patching", FIVE)
    verified = verify(model, pairs, atpstar.attribute(model, pairs, "atp*", FIVE), budget=12)
    done = set(verified.nodes)
    rest = [(t, tuple(int(i) for i in ix)) for t in FIVE for ix in torch.nonzero(torch.ones_like(truth.scores[t]))]
    largest = max(abs(float(truth.scores[t][ix])) for t, ix in rest if (t, ix) not in done)
    assert largest > 2.0
    job = Job(model, pairs, "noising", Cost(), False)
    spaces = Spaces(spaces_for(model, FIVE))
    missed_raw, missed_calibrated, checked_cost = 0, 0, 0
    for seed in range(6):
        bound = false_negative_bound(model, pairs, verified, samples=300, p=0.05, alpha=0.05, seed=seed)
        missed_raw += bound.max_effect_upper < largest
        flat = {name: torch.cat([getattr(bound, name)[t].flatten() for t in FIVE]) for name in ("upper", "estimate", "se")}
        keep = torch.isfinite(flat["estimate"])
        sample, top = calibration_sample(flat["upper"], flat["estimate"], keep, seed, CALIBRATION_TOP, CALIBRATION_RANDOM)
        nodes = [_locate(truth, int(i)) for i in sample]
        before = job.cost.forward_equivalents
        effects, _, _ = patch_nodes(job, spaces, nodes)  # [K, P]
        checked_cost += job.cost.forward_equivalents - before
        keep[sample] = False
        checked = {"exact": effects.mean(1), **{k: v[sample] for k, v in flat.items()}}
        found = calibrate(checked, top, float(flat["upper"][keep].max()), largest, 0.05, 0.05)
        calibrated = max(found.max_upper, float(effects.mean(1).abs().max()))  # checked nodes are known exactly
        missed_calibrated += calibrated < largest
        if bound.max_effect_upper < largest:
            assert not found.passed  # a certificate at θ = that effect would be refused
    assert missed_raw >= 3  # a 95 % bound should miss about 1 in 20
    assert missed_calibrated == 0
    assert checked_cost > 0


def _locate(truth: atpstar.Attribution, index: int) -> tuple[str, tuple[int, ...]]:
    for t in FIVE:
        n = truth.scores[t].numel()
        if index < n:
            return t, tuple(int(i) for i in torch.unravel_index(torch.tensor(index), truth.scores[t].shape))
        index -= n
    raise IndexError(index)
