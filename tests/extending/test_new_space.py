"""A node space added in one file plus a registration line works with every verb, checked by brute force."""

import pytest
from resid_space import ResidNodes
import torch

import atpstar
from atpstar.spaces import register_space, unregister_space
from atpstar.testing import check_method
from reference.models import build_hf, load, make_pairs

FAMILIES = ["gpt2", "gpt_neox", "llama"]


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_space(ResidNodes)  # the registration line (undone after this module's tests)
    try:
        yield
    finally:
        unregister_space(ResidNodes)


def brute_force_resid(model, pairs, direction="noising"):
    """[P, L, T] metric change when resid_pre_l[t] alone takes the source value, one full forward each."""
    base, source = pairs.base_and_source(direction)
    runs = {}
    for name, tokens in (("base", base), ("source", source)):
        run = atpstar.runner.Run(model.n_layers, record=["resid_pre"])
        with torch.no_grad():
            logits = model.unembed(model.run_layers(model.embed(tokens), run)[:, -1])
        runs[name] = (run, pairs.evaluate_metric(logits, torch.arange(pairs.n_pairs)))
    effects = torch.zeros(pairs.n_pairs, model.n_layers, pairs.seq_len, dtype=torch.float64)
    for layer in range(model.n_layers):
        for pos in range(pairs.seq_len):
            value = runs["source"][0].get("resid_pre", layer)[:, pos]

            def patch(at_layer, site, x, run, layer=layer, pos=pos, value=value):
                if at_layer == layer and site == "resid_pre":
                    x = x.clone()
                    x[:, pos] = value
                return x

            run = atpstar.runner.Run(model.n_layers, patch=patch)
            with torch.no_grad():
                logits = model.unembed(model.run_layers(model.embed(base), run)[:, -1])
            metric = pairs.evaluate_metric(logits, torch.arange(pairs.n_pairs))
            effects[:, layer, pos] = (metric - runs["base"][1]).double()
    return effects


@pytest.fixture(scope="module", params=FAMILIES)
def setting(request):
    return load(build_hf(request.param, n_layers=2, seed=0)), make_pairs(n_pairs=2, seq_len=5)


def test_exact_patching_of_the_new_space_is_brute_force(setting):
    model, pairs = setting
    result = atpstar.attribute(model, pairs, method="activation_patching", nodes=["resid"])
    assert result.per_pair["resid"].shape == (2, model.n_layers, 5)
    torch.testing.assert_close(result.per_pair["resid"].double(), brute_force_resid(model, pairs), rtol=1e-9, atol=1e-12)


def brute_force_atp_resid(model, pairs, direction="noising"):
    """[P, L, T] (resid_src - resid_base)[t] · ∂L/∂resid_pre_l[t], by autograd on a plain recorded run."""
    base, source = pairs.base_and_source(direction)
    source_run = atpstar.runner.Run(model.n_layers, record=["resid_pre"])
    with torch.no_grad():
        model.run_layers(model.embed(source), source_run)
    base_run = atpstar.runner.Run(model.n_layers, record=["resid_pre"])
    with torch.enable_grad():
        hidden = model.embed(base).detach().requires_grad_(True)
        logits = model.unembed(model.run_layers(hidden, base_run)[:, -1])
        metric = pairs.evaluate_metric(logits, torch.arange(pairs.n_pairs))
        acts = [base_run.get("resid_pre", layer) for layer in range(model.n_layers)]
        grads = torch.autograd.grad(metric.sum(), acts)
    diffs = [source_run.get("resid_pre", layer) - act.detach() for layer, act in enumerate(acts)]
    return torch.stack([(d * g).sum(-1) for d, g in zip(diffs, grads)], 1).double()  # [P, L, T]


def test_atp_on_the_new_space_is_the_linear_estimate(setting):
    model, pairs = setting
    estimate = atpstar.attribute(model, pairs, method="atp", nodes=["resid", "head"])
    assert set(estimate.per_pair) == {"resid", "head"}
    torch.testing.assert_close(
        estimate.per_pair["resid"].double(), brute_force_atp_resid(model, pairs), rtol=1e-9, atol=1e-12
    )


def test_verify_names_and_rows_of_the_new_space(setting):
    model, pairs = setting
    estimate = atpstar.attribute(model, pairs, method="atp", nodes=["resid"])
    checked = atpstar.verify(model, pairs, estimate, budget=3)
    truth = brute_force_resid(model, pairs)
    for (t, (layer, pos)), effect in zip(checked.nodes, checked.effects):
        torch.testing.assert_close(effect, truth[:, layer, pos], rtol=1e-9, atol=1e-12)
    assert checked.names[0].startswith(f"blocks.{checked.nodes[0][1][0]}.hook_resid_pre[pos ")
    row = estimate.to_rows(1)[0]
    assert set(row) >= {"layer", "pos", "score"} and "head" not in row or row["head"] in ("", None)


@pytest.mark.parametrize("method", ["activation_patching", "atp", "atp*"])
def test_the_new_space_passes_the_method_contract(method):
    check_method(method, nodes=["resid"])
