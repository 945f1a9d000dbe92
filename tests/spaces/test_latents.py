"""The latent node space: the method contract on latents, names and columns, saved results, and identities
(results of two dictionaries never mix)."""

from __future__ import annotations

import pytest
import torch

import atpstar
from atpstar.dictionaries import detach
from atpstar.errors import IdentityMismatchError, InputError
from atpstar.fingerprint import identity
from atpstar.spaces import LatentNodes, space_class
from atpstar.testing import check_method, tiny_model, tiny_pairs
from atpstar.testing.fixtures import write_gemma_scope, write_saelens


@pytest.fixture(scope="module")
def sae(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    d = atpstar.load_dictionary(write_saelens(root / "a", "blocks.0.hook_resid_post", 32, 6, seed=1), name="sae-a")
    other = atpstar.load_dictionary(write_saelens(root / "b", "blocks.0.hook_resid_post", 32, 6, seed=2), name="sae-a")
    gs = atpstar.load_dictionary(write_gemma_scope(root, "attn_out", 1, 32, 4, seed=3), name="gs")
    atpstar.dictionaries.attach([d, gs])
    yield d, other, gs
    detach(["sae-a", "gs"])


@pytest.mark.parametrize("method", ["activation_patching", "atp", "atp+qkfix", "atp*", "atp+ig"])
def test_latents_pass_the_method_contract(sae, method):
    check_method(method, nodes=["sae-a", "sae-a.error", "gs", "gs.error"])


def test_names_columns_and_a_saved_result(sae, tmp_path):
    d, _, _ = sae
    model, pairs = tiny_model(), tiny_pairs()
    result = atpstar.attribute(model, pairs, "atp", nodes=["head"], dictionaries=[d])
    assert space_class("sae-a") is LatentNodes and result.per_pair["sae-a"].shape == (3, 6, 5)
    assert result.per_pair["sae-a.error"].shape == (3, 5)
    spaces = result.spaces()
    assert spaces.name("sae-a", (4, 2)) == "blocks.0.hook_resid_post/sae-a[latent 4, pos 2]"
    assert spaces.name("sae-a.error", (3,)) == "blocks.0.hook_resid_post/sae-a.error[pos 3]"
    assert spaces.columns("sae-a", (4, 2)) == {"layer": 0, "index": 4, "pos": 2, "dictionary": "sae-a"}
    result.save(tmp_path / "r")
    detach(["sae-a"])  # a fresh process: the name is known from the result alone
    try:
        back = atpstar.Attribution.load(tmp_path / "r")
        assert [n.name for n in back.top(5)] == [n.name for n in result.top(5)]
        assert back.info["identity"]["dictionaries"] == f"sae-a={d.content_hash}"
    finally:
        atpstar.dictionaries.attach([d])
    result.to_csv(tmp_path / "r.csv", k=3)
    assert "dictionary" in (tmp_path / "r.csv").read_text().splitlines()[0]


def test_results_of_two_dictionaries_never_mix(sae):
    d, other, _ = sae
    model, pairs = tiny_model(), tiny_pairs()
    assert d.content_hash != other.content_hash
    first = atpstar.attribute(model, pairs, "atp", nodes=["sae-a"], dictionaries=[d])
    second = atpstar.attribute(model, pairs, "atp", nodes=["sae-a"], dictionaries=[other])  # same name, new weights
    try:
        assert first.info["identity"]["dictionaries"] != second.info["identity"]["dictionaries"]
        assert not torch.equal(first.per_pair["sae-a"], second.per_pair["sae-a"])
        with pytest.raises(IdentityMismatchError, match="dictionaries"):
            atpstar.verify(model, pairs, first, budget=2)  # the estimate of the other dictionary
        assert "dictionaries" not in identity(model, pairs, "noising", ["head"], "atp", {})  # site results unchanged
    finally:
        atpstar.dictionaries.attach([d])
    assert atpstar.verify(model, pairs, first, budget=2).effects.shape == (2, 3)


def test_verify_and_the_bound_on_latents_use_exact_latent_patches(sae):
    d, _, gs = sae
    model, pairs = tiny_model(), tiny_pairs()
    estimate = atpstar.attribute(model, pairs, "atp*", nodes=["sae-a", "sae-a.error", "gs", "gs.error"])
    truth = atpstar.attribute(model, pairs, "activation_patching", nodes=["sae-a", "sae-a.error", "gs", "gs.error"])
    checked = atpstar.verify(model, pairs, estimate, budget=6)
    for (t, index), effect in zip(checked.nodes, checked.effects):
        torch.testing.assert_close(effect.double(), truth.per_pair[t][(slice(None), *index)].double(), rtol=1e-9, atol=1e-12)
    bound = atpstar.false_negative_bound(model, pairs, checked, theta=0.05, samples=8)
    assert bound.n_unverified == (6 * 5 + 5) + (4 * 5 + 5) - 6
    found = atpstar.find(model, pairs, 0.05, nodes=["gs", "gs.error"])
    assert all(t in ("gs", "gs.error") for t, _ in found.nodes)


def test_a_method_without_a_latent_form_refuses_before_any_pass(sae):
    with pytest.raises(InputError, match="does not support"):
        atpstar.attribute(tiny_model(), tiny_pairs(), "subsampling", nodes=["sae-a"])


def test_latents_refuse_workers_before_any_pass(sae):
    with pytest.raises(InputError, match="in-process only"):
        atpstar.attribute(tiny_model(), tiny_pairs(), "atp", nodes=["sae-a"], workers=2)


def test_evaluate_and_plots_take_latents(sae, tmp_path):
    pytest.importorskip("matplotlib")
    from atpstar.plots import plot_heatmaps

    model, pairs = tiny_model(), tiny_pairs()
    types = ["sae-a", "sae-a.error", "head"]
    truth = atpstar.attribute(model, pairs, "activation_patching", nodes=types)
    estimates = [atpstar.attribute(model, pairs, m, nodes=types) for m in ("atp", "atp*")]
    evaluation = atpstar.evaluate(truth, estimates)
    assert set(evaluation.curves) == {"atp", "atp*"}
    assert all(path.exists() for path in plot_heatmaps(estimates[1], tmp_path / "maps"))
    with pytest.raises(InputError, match="latents nodes on their own"):
        atpstar.false_negative_bound(model, pairs, atpstar.verify(model, pairs, estimates[1], budget=3), samples=4)
