"""False-negative bound (Kramár et al. 2024) and the statistics under it (ops: Welford merge, Student t, Welch)."""

from __future__ import annotations

import math

import pytest
import torch

import atpstar
from atpstar.bound import false_negative_bound
from atpstar.ops import betainc, student_t_cdf, student_t_quantile, welch_se_df, welford_merge
from atpstar.verify import verify
from reference.toys import sparse_additive_toy

# Pure statistics -----------------------------------------------------------------------------------------


def test_welford_merge_equals_direct_mean_and_variance():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(50, 3, generator=g, dtype=torch.float64)
    count, mean, m2 = (torch.zeros(3, dtype=torch.float64) for _ in range(3))
    for chunk in data.split([7, 1, 20, 22]):
        n = torch.full((3,), float(len(chunk)), dtype=torch.float64)
        count, mean, m2 = welford_merge(count, mean, m2, n, chunk.mean(0), ((chunk - chunk.mean(0)) ** 2).sum(0))
    torch.testing.assert_close(mean, data.mean(0))
    torch.testing.assert_close(m2 / (count - 1), data.var(0))


def test_student_t_against_closed_forms_and_tables():
    x = torch.linspace(-40, 40, 161, dtype=torch.float64)
    torch.testing.assert_close(student_t_cdf(x, torch.ones_like(x)), 0.5 + torch.atan(x) / math.pi, rtol=0, atol=1e-14)
    torch.testing.assert_close(student_t_cdf(x, torch.full_like(x, 2.0)), 0.5 + x / (2 * torch.sqrt(2 + x**2)),
                               rtol=0, atol=1e-14)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    torch.testing.assert_close(student_t_cdf(x[::10] / 8, torch.full((17,), 1e8)), normal.cdf(x[::10] / 8), atol=1e-7, rtol=0)
    table = {1.0: 12.7062047362, 2.0: 4.30265272975, 10.0: 2.22813885196, 30.0: 2.04227245630}
    quantiles = student_t_quantile(0.975, torch.tensor(list(table)))
    torch.testing.assert_close(quantiles, torch.tensor(list(table.values()), dtype=torch.float64), rtol=1e-9, atol=0)
    prob = 1 - 1e-10
    tiny = student_t_quantile(prob, torch.tensor([1.0]))  # Cauchy: tan(pi (prob - 1/2))
    torch.testing.assert_close(tiny, torch.tensor([1 / math.tan(math.pi * (1 - prob))], dtype=torch.float64),
                               rtol=1e-8, atol=0)
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(betainc(f64(2.0), f64(3.0), f64(0.4)),
                               torch.tensor(0.5248, dtype=torch.float64), rtol=1e-12, atol=0)  # 1 - Σ_{k<2} C(4,k).4^k.6^(4-k)


def test_welch_se_and_df_match_the_two_sample_formula():
    variances = torch.tensor([[2.0], [5.0]], dtype=torch.float64)
    counts = torch.tensor([[10.0], [7.0]], dtype=torch.float64)
    se, df = welch_se_df(variances, counts)
    a, b = 2.0 / 10, 5.0 / 7
    assert float(se) == pytest.approx(math.sqrt(a + b))
    assert float(df) == pytest.approx((a + b) ** 2 / (a**2 / 9 + b**2 / 6))


# The bound ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted():
    model, pairs = sparse_additive_toy(planted=True)
    truth = atpstar.attribute(model, pairs, "activation_patching", nodes=["neuron"])
    return model, pairs, truth


def test_planted_node_left_unverified_is_flagged(planted):
    model, pairs, truth = planted
    verified = verify(model, pairs, truth, budget=1)  # the largest planted node only
    (left_node,) = {(0, 3, 5), (0, 3, 11)} - {verified.nodes[0][1]}
    left = float(truth.scores["neuron"][left_node].abs())
    assert verified.nodes[0][0] == "neuron" and left > 0.1
    bound = false_negative_bound(model, pairs, verified, theta=0.5 * left, samples=64)
    assert bound.n_unverified == 63
    assert bound.max_effect_upper >= left
    assert bound.prob_upper > 0.9
    assert bound.worst_node == ("neuron", left_node)
    assert "additive" in bound.assumption and "additive" in str(bound)
    assert bound.cost.forward == pytest.approx(2 * 2 + 64 * 2)  # 2P + samples x P, one layer
    assert math.isnan(float(bound.upper["neuron"][verified.nodes[0][1]]))


def test_nothing_large_left_gives_a_small_bound(planted):
    model, pairs, truth = planted
    verified = verify(model, pairs, truth, budget=2)
    theta = 0.5 * float(truth.scores["neuron"][0, 3, [5, 11]].abs().min())
    bound = false_negative_bound(model, pairs, verified, theta=theta, samples=64)
    remaining = truth.scores["neuron"].abs().flatten().sort(descending=True).values[2]
    assert remaining <= bound.max_effect_upper < 0.05 * theta
    assert bound.prob_upper < 1e-6


def test_plain_list_needs_node_types_and_verified_nodes_are_never_patched(planted):
    model, pairs, truth = planted
    with pytest.raises(atpstar.InputError, match="nodes="):
        false_negative_bound(model, pairs, [("neuron", (0, 3, 5))])
    everything = [("neuron", tuple(index.tolist())) for index in torch.nonzero(torch.ones(1, 4, 16))]
    bound = false_negative_bound(model, pairs, everything, nodes=["neuron"], samples=8)
    assert bound.n_unverified == 0 and bound.max_effect_upper == 0.0 and bound.worst_node is None
    assert math.isnan(bound.prob_upper)
    assert bound.cost.forward == pytest.approx(2 * 2)  # nothing patched: only the base/source runs


def test_bound_holds_over_seeds():
    """(a) must cover the true largest unverified |c(n)| at rate >= 1 - alpha; on this additive toy
    (all 64 neurons of a dense 1-layer model, top 3 verified) 20 seeds at alpha = 0.05 must give >= 18."""
    model, pairs = sparse_additive_toy(planted=False)
    truth = atpstar.attribute(model, pairs, "activation_patching", nodes=["neuron"])
    verified = verify(model, pairs, truth, budget=3)
    largest_left = float(truth.scores["neuron"].abs().flatten().sort(descending=True).values[3])
    covered, widths = 0, []
    for seed in range(20):
        bound = false_negative_bound(model, pairs, verified, samples=32, seed=seed, alpha=0.05)
        covered += largest_left <= bound.max_effect_upper
        widths.append(bound.max_effect_upper / largest_left)
    assert covered >= 18, (covered, widths)
    assert max(widths) < 10  # informative, not vacuous


def test_bad_options(planted):
    model, pairs, truth = planted
    verified = verify(model, pairs, truth, budget=1)
    for options in ({"alpha": 1.5}, {"theta": -1.0}, {"samples": 1}, {"p": 0.0}):
        with pytest.raises(atpstar.InputError):
            false_negative_bound(model, pairs, verified, **options)
    with pytest.raises(atpstar.InputError, match="outside"):
        false_negative_bound(model, pairs, [("neuron", (0, 9, 0))], nodes=["neuron"])


def test_bound_record_round_trips_through_its_parts(planted):
    model, pairs, truth = planted
    verified = verify(model, pairs, truth, budget=1)
    bound = false_negative_bound(model, pairs, verified, theta=0.1, samples=64)
    meta, tensors = bound.to_parts()
    back = type(bound).from_parts(meta, tensors)
    assert back.worst_node == bound.worst_node and back.worst_name == bound.worst_name
    assert back.max_effect_upper == bound.max_effect_upper and back.cost == bound.cost
    torch.testing.assert_close(back.upper["neuron"], bound.upper["neuron"].double(), equal_nan=True, rtol=0, atol=0)
