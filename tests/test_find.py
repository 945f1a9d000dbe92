"""``atpstar.find``: the estimate -> verify -> bound loop, its certificate, budget and errors.

Ground truth is exhaustive activation patching on sparse additive toys (one-layer parallel-residual
GPT-NeoX without final norm: neuron effects add up exactly, so the bound's assumption holds).
"""

from __future__ import annotations

import math

import pytest
import torch

import atpstar
from atpstar.find.localization import Localization
from atpstar.model import as_model
from reference.toys import sparse_additive_toy


def _true_large(truth: atpstar.Attribution, theta: float) -> set[tuple[str, tuple[int, ...]]]:
    scores = truth.scores["neuron"]
    return {("neuron", tuple(int(i) for i in index)) for index in torch.nonzero(scores.abs() >= theta)}


@pytest.fixture(scope="module")
def planted():
    """4,096 neurons per pair (16 positions x 256); only the last position matters, neurons 5 and 11 strongly."""
    model, pairs = sparse_additive_toy(planted=True, seq_len=16, d_mlp=256)
    truth = atpstar.attribute(model, pairs, "activation_patching", nodes=["neuron"])
    return model, pairs, truth


def _misleading_estimate(truth: atpstar.Attribution, hide: tuple[int, ...]) -> atpstar.Attribution:
    """An estimate that ranks every node right except ``hide``, which it scores 0 (last)."""
    per_pair = truth.per_pair["neuron"].clone()
    per_pair[(slice(None), *hide)] = 0.0
    scores = per_pair.abs().mean(0)
    return atpstar.Attribution(
        "atp",
        {},
        truth.direction,
        truth.metric,
        truth.model_id,
        {"neuron": per_pair},
        {"neuron": scores},
        "mean_abs",
        atpstar.Cost(forward=4.0, backward=2.0),
    )


def test_finds_every_large_node_and_certifies_with_a_bound(planted):
    model, pairs, truth = planted
    theta = 0.5 * float(truth.scores["neuron"].abs().max())
    want = _true_large(truth, theta)
    assert len(want) >= 1
    found = atpstar.find(model, pairs, theta, nodes=["neuron"], estimator="atp", patience=4)
    assert found.certified
    assert set(found.nodes) == want
    assert found.bound is not None and found.bound.n_unverified > 0  # certified by the bound, not exhaustively
    assert found.bound.max_effect_upper < theta
    assert "additive" in found.bound.assumption and "additive" in found.certificate()["assumption"]
    exact = truth.scores["neuron"]
    for (t, index), effect in zip(found.nodes, found.effects.tolist()):
        assert effect == pytest.approx(float(exact[index]), rel=1e-9, abs=1e-12)
    assert found.effects.abs().tolist() == sorted(found.effects.abs().tolist(), reverse=True)
    assert 0 < found.cost_fraction < 1
    total = sum(c.forward_equivalents for c in found.cost.values())
    assert found.total_cost.forward_equivalents == pytest.approx(total)
    assert found.history[0]["stage"] == "verify_estimate_order" and found.history[-1]["certified"]
    assert found.history[-1]["cost_fe"] == pytest.approx(total)


def test_the_bound_recovers_a_node_the_estimate_ranks_last(planted):
    model, pairs, truth = planted
    exact = truth.scores["neuron"]
    hide = tuple(int(i) for i in torch.nonzero(exact.abs() == exact.abs().max())[0])
    theta = 0.5 * float(exact.abs().max())
    found = atpstar.find(model, pairs, theta, nodes=["neuron"], estimator=_misleading_estimate(truth, hide), patience=4)
    assert found.certified
    assert ("neuron", hide) in found.nodes
    assert set(found.nodes) == _true_large(truth, theta)
    stages = found.verified.info["stage"]
    assert stages[[index for _, index in found.verified.nodes].index(hide)] in ("verify_bound_order", "verify_rest")
    assert found.cost["estimate"].forward_equivalents == pytest.approx(8.0)  # the given estimate's own cost


def test_certified_runs_never_miss_a_large_node_over_seeds():
    """Dense additive toy (every neuron has some effect): whenever find certifies, it holds every
    node >= theta. 2 seeds x 2 thresholds; the certificate's error rate is <= alpha per run."""
    model, pairs = sparse_additive_toy(planted=False, seq_len=16, d_mlp=256)
    truth = atpstar.attribute(model, pairs, "activation_patching", nodes=["neuron"])
    ranked = truth.scores["neuron"].abs().flatten().sort(descending=True).values
    certified = 0
    for theta in (float(ranked[2]) * 0.999, float(ranked[6]) * 0.999):
        want = _true_large(truth, theta)
        for seed in range(2):
            found = atpstar.find(model, pairs, theta, nodes=["neuron"], estimator="atp", seed=seed, patience=2)
            if found.certified:
                certified += 1
                assert want <= set(found.nodes), (theta, seed)
    assert certified >= 3  # the loop must also reach a certificate, not only avoid wrong ones


def test_budget_spent_gives_no_certificate_and_says_what_is_left(planted):
    model, pairs, truth = planted
    theta = 0.5 * float(truth.scores["neuron"].abs().max())
    found = atpstar.find(model, pairs, theta, nodes=["neuron"], estimator="atp", budget=30.0, patience=4)
    assert not found.certified
    assert found.total_cost.forward_equivalents <= 30.0 + 1e-9
    left = found.certificate()["left"]
    assert left["n_unverified"] > 0 and left["n_unverified"] == 4096 - found.verified.n_verified
    assert "budget" in found.info["stopped"] and "NOT certified" in found.statement()
    assert str(left["n_unverified"]) in found.statement()


def test_small_population_is_verified_exactly(planted):
    model, pairs = sparse_additive_toy(planted=True, seq_len=4)  # 64 neurons: cheaper to patch them all
    found = atpstar.find(model, pairs, 0.05, nodes=["neuron"], estimator="atp")
    assert found.certified and found.verified.n_verified == 64
    assert found.bound is not None and found.bound.n_unverified == 0 and found.bound.max_effect_upper == 0.0
    assert "every node was verified" in found.statement()


def test_a_budget_below_the_estimate_is_refused_before_any_pass(planted):
    model, pairs, truth = planted
    theta = 0.5 * float(truth.scores["neuron"].abs().max())
    cost = atpstar.METHODS["atp"]().expected_cost(as_model(model), pairs, ["neuron"], {}).forward_equivalents
    calls = []
    hooks = [m.register_forward_hook(lambda *args: calls.append(1)) for m in model.hf_model.modules()]
    try:
        with pytest.raises(atpstar.errors.InputError, match=f"costs {cost:g} forward equivalents, over budget=") as err:
            atpstar.find(model, pairs, theta, nodes=["neuron"], estimator="atp", budget=cost / 2, patience=4)
    finally:
        for hook in hooks:
            hook.remove()
    assert f"budget >= {cost:g}" in str(err.value)
    assert calls == []  # no pass ran
    given = _misleading_estimate(truth, (0, 0))  # an estimate given already made counts its cost too
    with pytest.raises(atpstar.errors.InputError, match="budget"):
        atpstar.find(model, pairs, theta, nodes=["neuron"], estimator=given, budget=4.0, patience=4)


def test_exhaustive_fallback_costs_no_more_than_activation_patching():
    """When the estimate and one bound would cost as much as patching everything, find patches everything."""
    model, pairs = sparse_additive_toy(planted=True, seq_len=4)  # 64 neurons
    truth = atpstar.attribute(model, pairs, "activation_patching", nodes=["neuron"])
    for theta in (0.05, 0.5 * float(truth.scores["neuron"].abs().max())):
        found = atpstar.find(model, pairs, theta, nodes=["neuron"], estimator="atp")
        assert found.certified and found.verified.n_verified == 64
        assert found.total_cost.forward_equivalents <= truth.cost.forward_equivalents + 1e-9
        assert set(found.nodes) == _true_large(truth, theta)
        assert "exhaustive patching" in found.certificate()["fallback"]
        assert found.history[-1]["fallback"] == found.certificate()["fallback"]


def test_save_load_round_trip(planted, tmp_path):
    model, pairs, truth = planted
    theta = 0.5 * float(truth.scores["neuron"].abs().max())
    found = atpstar.find(model, pairs, theta, nodes=["neuron"], estimator="atp", patience=4)
    found.save(tmp_path / "found")
    back = Localization.load(tmp_path / "found.json")
    assert back.nodes == found.nodes and back.certified == found.certified and back.history == found.history
    torch.testing.assert_close(back.effects, found.effects.double())
    torch.testing.assert_close(back.verified.effects, found.verified.effects.double())
    assert back.verified.nodes == found.verified.nodes
    assert back.cost == found.cost and back.certificate() == found.certificate()
    assert found.bound is not None and back.bound is not None
    assert back.bound.max_effect_upper == found.bound.max_effect_upper
    torch.testing.assert_close(back.bound.upper["neuron"], found.bound.upper["neuron"].double(), equal_nan=True)
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / "found.safetensors").write_bytes(b"truncated")
    with pytest.raises(atpstar.AtpstarError, match="truncated|not a readable"):
        Localization.load(tmp_path / "found")
    with pytest.raises(atpstar.InputError, match="no saved localization"):
        Localization.load(tmp_path / "missing")


def test_bad_input_fails_before_any_work(planted):
    model, pairs, truth = planted
    bad = [
        ({"theta": 0.0}, "theta"),
        ({"theta": math.nan}, "theta"),
        ({"alpha": 1.0}, "alpha"),
        ({"budget": -5}, "budget"),
        ({"estimator": "atp-star"}, "unknown estimator"),
        ({"nodes": ["neurons"]}, "unknown node type"),
        ({"patience": 0}, "patience"),
        ({"max_rounds": 0}, "max_rounds"),
        ({"direction": "sideways"}, "direction"),
        ({"estimator": _misleading_estimate(truth, (0, 3, 5)), "direction": "denoising"}, "noising"),
    ]
    for change, match in bad:
        options = {"theta": 0.1, "nodes": ["neuron"], **change}
        theta = options.pop("theta")
        with pytest.raises(atpstar.InputError, match=match):
            atpstar.find(model, pairs, theta, **options)
    with pytest.raises(atpstar.InputError, match="PromptPairs"):
        atpstar.find(model, "pairs", 0.1, nodes=["neuron"])
    with pytest.raises(atpstar.InputError, match="shape"):
        atpstar.find(model, pairs.subset([0]), 0.1, nodes=["neuron"], estimator=truth)


def test_each_searched_engine_is_priced_and_kept_to_its_rules():
    from atpstar.find.engines import ENGINES, engine_facts
    from atpstar.spaces import Spaces, spaces_for

    model = atpstar.load_model("toy-ioi")
    sites = Spaces(spaces_for(model, ["query", "head"]))
    assert engine_facts(sites, {"workers": 2, "ray_address": None}) is ENGINES["sites"]
    seq_len = 5
    share = ENGINES["sites"].patch_cost(model, sites.of("head"), "head", seq_len)  # [L, H, T]
    layers = torch.arange(model.n_layers, dtype=torch.float64)
    torch.testing.assert_close(share[:, 0, 0], (model.n_layers - layers) / model.n_layers)
    mixed = Spaces(spaces_for(model, ["head", "edge"]))
    with pytest.raises(atpstar.InputError, match="edges alone"):
        engine_facts(mixed, {"workers": None, "ray_address": None})
