"""AtP, the QK fix and GradDrop against brute-force references, and the identities the AtP* paper states (float64)."""

from __future__ import annotations

import pytest
import torch

import atpstar
from atpstar.runner import Run
from reference import brute, hooks
from reference.models import assert_rel_close, build_hf, load, make_pairs

ALL = ["neuron", "query", "key", "value", "head"]
REL = 1e-6


@pytest.mark.parametrize("direction", ["noising", "denoising"])
def test_atp_matches_hook_reference(hf_model, family, direction):
    pairs = make_pairs()
    expected = hooks.atp(hooks.reference_copy(hf_model), pairs, direction)
    result = atpstar.attribute(load(hf_model), pairs, method="atp", nodes=ALL, direction=direction)
    for t in ALL:
        assert float(expected[t].abs().max()) > 1e-3, t
        assert_rel_close(result.per_pair[t], expected[t], REL, f"{family} {direction} {t}")
        assert_rel_close(result.scores[t], expected[t].abs().mean(0), REL, f"{t} scores = mean |per_pair|")


def test_atp_logprob_metric():
    hf = build_hf("gpt_neox", seed=2)
    pairs = make_pairs(metric="logprob")
    expected = hooks.atp(hooks.reference_copy(hf), pairs)
    result = atpstar.attribute(load(hf), pairs, method="atp", nodes=ALL)
    for t in ALL:
        assert_rel_close(result.per_pair[t], expected[t], REL, t)


@pytest.mark.parametrize("direction", ["noising", "denoising"])
def test_qkfix_matches_brute_force_softmax(hf_model, family, direction):
    """Every query and key node: exact softmax row(s) recomputed with that one vector replaced."""
    model = load(hf_model)
    pairs = make_pairs()
    expected = brute.atp(model, pairs, ALL, direction, qk_fix=True)
    result = atpstar.attribute(model, pairs, method="atp+qkfix", nodes=ALL, direction=direction)
    plain = atpstar.attribute(model, pairs, method="atp", nodes=ALL, direction=direction)
    for t in ALL:
        assert_rel_close(result.per_pair[t], expected[t], REL, f"{family} {t}")
    for t in ("value", "head", "neuron"):  # the fix leaves linear nodes alone
        assert_rel_close(result.per_pair[t], plain.per_pair[t], 1e-12, t)
    # The fix must matter somewhere on saturated heads, else this test checks nothing.
    assert float((result.per_pair["key"] - plain.per_pair["key"]).abs().max()) > 1e-3


def test_qkfix_alone_for_query_or_key_nodes():
    """Asking for only one of query/key must still run the fix (the pattern gradient is recorded)."""
    hf = build_hf("llama")
    model = load(hf)
    pairs = make_pairs()
    expected = brute.atp(model, pairs, ["key"], qk_fix=True)
    result = atpstar.attribute(model, pairs, method="atp+qkfix", nodes=["key"])
    assert_rel_close(result.per_pair["key"], expected["key"], REL, "key")


@pytest.mark.parametrize("method, qk_fix", [("atp+graddrop", False), ("atp*", True)])
def test_graddrop_cheap_scheme_equals_separate_dropped_backwards(hf_model, family, method, qk_fix):
    model = load(hf_model)
    pairs = make_pairs()
    expected = brute.graddrop(model, pairs, ALL, "noising", qk_fix=qk_fix)
    result = atpstar.attribute(model, pairs, method=method, nodes=ALL)
    for t in ALL:
        assert_rel_close(result.per_pair[t], expected[t], REL, f"{family} {method} {t}")
        assert bool((result.per_pair[t] >= 0).all())


def test_graddrop_three_layers_denoising():
    hf = build_hf("gpt2", n_layers=3, seed=7)
    model = load(hf)
    pairs = make_pairs(n_pairs=2, seq_len=5)
    expected = brute.graddrop(model, pairs, ALL, "denoising", qk_fix=True)
    result = atpstar.attribute(model, pairs, method="atp*", nodes=ALL, direction="denoising")
    for t in ALL:
        assert_rel_close(result.per_pair[t], expected[t], REL, t)


def test_graddrop_of_last_layer_nodes_is_abs_atp(hf_model):
    """§10.4: a last-layer node has only a direct effect, so ĉ_GD = |Î_AtP| (and for AtP*, |Î_AtP+QK|)."""
    model = load(hf_model)
    pairs = make_pairs()
    for plain_id, drop_id in (("atp", "atp+graddrop"), ("atp+qkfix", "atp*")):
        plain = atpstar.attribute(model, pairs, method=plain_id, nodes=ALL)
        dropped = atpstar.attribute(model, pairs, method=drop_id, nodes=ALL)
        for t in ALL:
            last = (slice(None), -1)
            assert_rel_close(dropped.per_pair[t][last], plain.per_pair[t][last].abs(), 1e-10, f"{drop_id} {t}")


def _linear_downstream(family: str):
    """GPT-NeoX with parallel residual (or GPT-2) and no final layer norm: the last layer writes linearly."""
    hf = build_hf(family, seed=11)
    if family == "gpt_neox":
        hf.gpt_neox.final_layer_norm = torch.nn.Identity()
        return hf, ["neuron", "head", "value"]
    hf.transformer.ln_f = torch.nn.Identity()
    return hf, ["neuron"]


@pytest.mark.parametrize("family_name", ["gpt_neox", "gpt2"])
def test_atp_equals_patching_when_linear_downstream(family_name):
    """§10.1: last-layer nodes of a model with no final norm (NeoX: parallel residual) under logit_diff."""
    hf, node_types = _linear_downstream(family_name)
    model = load(hf)
    pairs = make_pairs()
    exact = atpstar.attribute(model, pairs, method="activation_patching", nodes=node_types)
    estimate = atpstar.attribute(model, pairs, method="atp", nodes=node_types)
    for t in node_types:
        last = exact.per_pair[t][:, -1]
        assert float(last.abs().max()) > 1e-3
        assert_rel_close(estimate.per_pair[t][:, -1], last, 1e-9, t)
    # Not an identity for earlier layers: the check above is not trivially true everywhere.
    assert float((estimate.per_pair["neuron"][:, 0] - exact.per_pair["neuron"][:, 0]).abs().max()) > 1e-6


def test_denoising_is_minus_noising_when_linear_downstream():
    """§10.7: with a constant gradient (linear downstream), swapping base and source flips the sign."""
    hf, _ = _linear_downstream("gpt_neox")
    model = load(hf)
    pairs = make_pairs()
    for method in ("atp", "activation_patching"):
        noising = atpstar.attribute(model, pairs, method=method, nodes=["neuron", "head"])
        denoising = atpstar.attribute(model, pairs, method=method, nodes=["neuron", "head"], direction="denoising")
        assert denoising.direction == "denoising"
        for t in ("neuron", "head"):
            assert_rel_close(denoising.per_pair[t][:, -1], -noising.per_pair[t][:, -1], 1e-9, f"{method} {t}")
        assert float((denoising.per_pair["head"][:, 0] + noising.per_pair["head"][:, 0]).abs().max()) > 1e-6


def test_cancellation_toy_atp_zero_graddrop_not():
    """§10.3: a layer-0 neuron whose direct and indirect gradient paths cancel: AtP = 0, GradDrop = |Î_1|."""
    hf = build_hf("gpt2", saturated=False, seed=5, activation_function="relu")
    model = load(hf)
    base = make_pairs(n_pairs=1)
    noise = base.noise.clone()
    noise[:, -1] = (base.clean[:, -1] + 3) % base.clean.max()  # the last token differs too
    pairs = atpstar.PromptPairs(base.clean, noise, base.answer, base.distractor)
    clean_run, _ = brute.records(model, pairs.clean)
    noise_run, _ = brute.records(model, pairs.noise)
    clean_act, noise_act = clean_run.records["neuron"][0][0], noise_run.records["neuron"][0][0]  # [T, M]
    # A neuron at the last position (the only one with a direct path to the metric), silent on the clean
    # prompt there (ReLU gives exact 0) and active on noise. Where it fires elsewhere on the clean prompt,
    # editing its write moves the clean forward a little, so the orthogonalisation below is iterated.
    t = clean_act.shape[0] - 1
    score = torch.where(clean_act[t] == 0, noise_act[t], torch.zeros_like(noise_act[t]))
    i = int(score.argmax())
    assert float(score[i]) > 0.05, "no usable neuron in this toy model"
    row = hf.transformer.h[0].mlp.c_proj.weight[i]  # Conv1D [M, D]: neuron i's write to the residual
    original = row.detach().clone()
    # Fixed point: the original write minus its component along g, where g depends (weakly) on the write.
    for _ in range(20):
        run = Run(model.n_layers, record=("resid_pre",))
        with torch.enable_grad():
            final = model.run_layers(model.embed(pairs.clean).detach().requires_grad_(True), run)
            metric = hooks.metric_of(model.unembed(final[:, -1]), pairs.answer, pairs.distractor, "logit_diff")
            (grad_post0,) = torch.autograd.grad(metric.sum(), run.records["resid_pre"][1])
        g = grad_post0[0, t]
        with torch.no_grad():
            row.copy_(original - (original @ g) / (g @ g) * g)
    atp_value = atpstar.attribute(model, pairs, method="atp", nodes=["neuron"]).per_pair["neuron"][0, 0, t, i]
    gd_value = atpstar.attribute(model, pairs, method="atp+graddrop", nodes=["neuron"]).per_pair["neuron"][0, 0, t, i]
    dropped = brute.atp(model, pairs, ["neuron"], drop_layer=1)["neuron"][0, 0, t, i]
    assert abs(float(atp_value)) < 1e-8
    assert float(gd_value) > 1e-3
    assert abs(float(gd_value) - abs(float(dropped)) / (model.n_layers - 1)) <= 1e-9 * float(gd_value)


@pytest.mark.parametrize("family_name", ["gpt2", "gpt_neox", "llama"])
def test_atp_matches_finite_differences(family_name):
    """(L(n + εΔn) - L(n)) / ε → Δn · ∂L/∂n, for the largest-|AtP| node of each type."""
    model = load(build_hf(family_name))
    pairs = make_pairs(n_pairs=1)
    result = atpstar.attribute(model, pairs, method="atp", nodes=ALL)
    source, _ = brute.records(model, pairs.noise)
    base, _ = brute.records(model, pairs.clean)
    eps = 1e-6

    def metric_with(patch):
        with torch.no_grad():
            run = Run(model.n_layers, patch=patch)
            final = model.run_layers(model.embed(pairs.clean), run)
            return hooks.metric_of(model.unembed(final[:, -1]), pairs.answer, pairs.distractor, "logit_diff")[0]

    unpatched = metric_with(None)
    for t in ALL:
        values = result.per_pair[t][0]
        index = tuple(int(i) for i in torch.unravel_index(values.abs().argmax(), values.shape))
        layer, site = index[0], brute.SITE[t]
        where = (0, index[1], index[2])  # neuron records [P, T, M]; others [P, H|K, T, E]
        delta = source.records[site][layer][where] - base.records[site][layer][where]

        def patch(at_layer, at_site, x, run, layer=layer, site=site, where=where, delta=delta):
            if at_layer == layer and at_site == site:
                x = x.clone()
                x[where] = x[where] + eps * delta
            return x

        finite = (metric_with(patch) - unpatched) / eps
        assert abs(float(finite) - float(values[index])) <= 1e-4 * abs(float(values[index])), t
