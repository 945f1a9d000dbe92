"""Node-level ``atp+ig`` against brute-force integrated gradients (``reference.ig``: module hooks on the
transformers model, interpolated layer-0 inputs, autograd), float64, three families."""

from __future__ import annotations

import pytest
import torch
from reference import hooks
from reference.ig import integrated_gradients
from reference.models import assert_rel_close, build_hf, load, make_pairs
from test_batching import oom_above

import atpstar
from atpstar.methods.ig import IntegratedGradients

ALL = ["neuron", "query", "key", "value", "head"]


@pytest.mark.parametrize(("steps", "direction"), [(1, "noising"), (3, "noising"), (2, "denoising")])
def test_atp_ig_matches_brute_force_integrated_gradients(hf_model, family, steps, direction):
    pairs = make_pairs()
    expected = integrated_gradients(hooks.reference_copy(hf_model), pairs, steps, direction)
    result = atpstar.attribute(load(hf_model), pairs, method="atp+ig", nodes=ALL, ig_steps=steps, direction=direction)
    for t in ALL:
        assert float(expected[t].abs().max()) > 1e-3, t
        assert_rel_close(result.per_pair[t], expected[t], 1e-8, f"{family} IG({steps}) {direction} {t}")
    assert result.cost.forward == (2 + steps) * pairs.n_pairs and result.cost.backward == steps * pairs.n_pairs


def test_one_step_is_atp_at_the_source_run(hf_model, family):
    # m = 1 uses the gradient at the source prompt only: AtP's product with the source run's gradient,
    # which differs from plain AtP (gradient at the base run) -- the reference must tell them apart.
    pairs = make_pairs()
    ig = atpstar.attribute(load(hf_model), pairs, method="atp+ig", nodes=["head"], ig_steps=1)
    atp = atpstar.attribute(load(hf_model), pairs, method="atp", nodes=["head"])
    assert not ig.per_pair["head"].allclose(atp.per_pair["head"], rtol=1e-3)


def test_keep_top_holds_each_pairs_top_k_and_exact_scores(tmp_path):
    model, pairs = load(build_hf("gpt2", n_layers=2, seed=8)), make_pairs(n_pairs=3)
    dense = atpstar.attribute(model, pairs, method="atp+ig", nodes=["neuron"], ig_steps=2)
    top = atpstar.attribute(model, pairs, method="atp+ig", nodes=["neuron"], ig_steps=2, keep="top", top_k=5)
    assert top.per_pair["neuron"].is_sparse and top.info["keep"] == "top"
    for p in range(pairs.n_pairs):
        want = dense.per_pair["neuron"][p].flatten()
        kept = top.per_pair["neuron"][p].to_dense().flatten()
        chosen = want.abs().topk(5).indices
        assert torch.equal(kept[chosen], want[chosen]) and int((kept != 0).sum()) == 5
    assert_rel_close(top.scores["neuron"], dense.scores["neuron"], 1e-12, "scores from running sums")
    disk = atpstar.attribute(
        model, pairs, method="atp+ig", nodes=["neuron"], ig_steps=2, keep="disk", out_dir=str(tmp_path / "pp")
    )
    assert disk.info["keep"] == "disk"
    assert torch.equal(atpstar.read_per_pair(tmp_path / "pp", "neuron"), dense.per_pair["neuron"])


def test_out_of_memory_halves_the_batch_and_keeps_the_numbers(monkeypatch):
    model, pairs = load(build_hf("llama", n_layers=2, seed=11)), make_pairs(n_pairs=6, seq_len=5, seed=12)
    want = atpstar.attribute(model, pairs, method="atp+ig", nodes=["neuron", "key"], ig_steps=2, batch_size=6)
    flaky = oom_above(2, lambda self, model, pairs, index, *rest: len(index))(IntegratedGradients._estimate)
    monkeypatch.setattr(IntegratedGradients, "_estimate", flaky)
    with pytest.warns(UserWarning, match="out of memory"):
        got = atpstar.attribute(model, pairs, method="atp+ig", nodes=["neuron", "key"], ig_steps=2, batch_size=6)
    assert flaky.calls[:3] == [6, 3, 1] and got.info["oom_retries"] == 2
    for t in want.per_pair:
        torch.testing.assert_close(got.per_pair[t], want.per_pair[t], rtol=1e-10, atol=1e-13)  # batch shapes: rounding
    assert got.cost.forward_equivalents == want.cost.forward_equivalents  # failed batches are not counted
