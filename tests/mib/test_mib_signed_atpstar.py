"""Edge AtP*'s MIB score (design record 0029): GradDrop's magnitude with the sign of the estimate before
GradDrop (the QK-fixed AtP for ``atp*``, AtP for ``atp+graddrop``), on tiny float64 models of three families.

The |score| ranking (MIB's CMD, atpstar's own ``scores``) is GradDrop's as before, bit for bit; only the
signed ranking (CPR) changes, which with GradDrop's never-negative per-pair scores used to start from the
smallest edges.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from mib_reference import area_under_curve, load_circuit

import atpstar
from atpstar.edges.circuits import SIGN
from atpstar.edges.mib import batch_sizes, mib_scores
from atpstar.errors import InputError
from reference.models import build_hf, load, make_pairs

METHODS = ("atp*", "atp+qkfix", "atp+graddrop", "atp")
BEFORE_GRADDROP = {"atp*": "atp+qkfix", "atp+graddrop": "atp"}
TINY = 1e-10  # per-pair estimates smaller than this have no reliable sign


def _results(family: str, n_pairs: int) -> tuple:
    hf = build_hf(family, n_layers=2, seed=21)
    model = load(hf)
    pairs = make_pairs(n_pairs=n_pairs, seq_len=6, seed=22)
    return hf, model, pairs, {m: atpstar.attribute(model, pairs, method=m, nodes=["edge"]) for m in METHODS}


@pytest.fixture(scope="module", params=["gpt2", "gpt_neox", "llama"])
def three_pairs(request):
    return _results(request.param, 3)


def unsigned(result):
    """The result as the old code wrote it: GradDrop magnitudes, no sign."""
    return dataclasses.replace(result, extras={}, options={**result.options, "grad_drop": False})


@pytest.mark.parametrize("method", sorted(BEFORE_GRADDROP))
def test_per_pair_sign_is_the_sign_of_the_estimate_before_graddrop(three_pairs, method):
    _, _, pairs, results = three_pairs
    sign = results[method].extras[SIGN]
    before = results[BEFORE_GRADDROP[method]].per_pair["edge"]
    assert sign.dtype == torch.int8 and sign.shape == before.shape == (pairs.n_pairs, sign.shape[1])
    clear = before.abs() > TINY
    assert clear.float().mean() > 0.5
    assert torch.equal(sign[clear], before.sign()[clear].to(torch.int8))
    assert (results[method].per_pair["edge"] >= 0).all()  # the per-pair scores stay GradDrop's magnitudes
    assert not any(k.startswith("sign") for m in ("atp", "atp+qkfix") for k in results[m].extras)


def test_mib_score_is_the_graddrop_magnitude_with_the_signed_means_sign(three_pairs):
    _, _, pairs, results = three_pairs
    result = results["atp*"]
    g = result.per_pair["edge"].double()
    sigma = results["atp+qkfix"].per_pair["edge"].double().sign()
    for batch_size in (20, 2):
        sizes = batch_sizes(pairs.n_pairs, batch_size).double()[:, None]  # [P, 1]
        magnitude = (g / sizes).mean(0)
        signed = (sigma * g / sizes).mean(0)
        scores = mib_scores(result, batch_size)
        # |score| is bit-equal to what the old code wrote: the |score| ranking (CMD) does not move
        assert torch.equal(scores.abs(), mib_scores(unsigned(result), batch_size).abs())
        assert torch.equal(scores.abs(), magnitude)
        clear = signed.abs() > TINY
        assert torch.equal(scores.sign()[clear], -signed.sign()[clear])  # MIB's loss is minus the metric
        assert bool((scores > 0).any()) and bool((scores < 0).any())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_pair_sign_is_the_qk_fixed_atps_and_size_graddrops(family):
    _, _, _, results = _results(family, 1)
    atp_star, qk_fixed = mib_scores(results["atp*"]), mib_scores(results["atp+qkfix"])
    clear = (qk_fixed.abs() > TINY) & (atp_star != 0)  # a GradDrop magnitude of 0 has no sign to show
    assert clear.float().mean() > 0.5
    assert torch.equal(atp_star.sign()[clear], qk_fixed.sign()[clear])
    assert torch.equal(atp_star.abs(), results["atp*"].per_pair["edge"][0].double())  # one pair, batch of 1


def test_signed_ranking_picks_other_circuits_than_the_magnitudes_and_keeps_cmd():
    """Fails on the old code: there every atp* MIB score was <= 0, so the CPR circuits were its smallest edges."""
    _, model, pairs, results = _results("gpt2", 3)
    result = results["atp*"]
    assert bool((mib_scores(result) > 0).any())
    curve = atpstar.faithfulness_curve(model, pairs, result)
    old = atpstar.faithfulness_curve(model, pairs, unsigned(result))
    assert old.cpr == pytest.approx(0.25, abs=0.02)  # the smallest edges first: f ~ 0 until the last fraction
    assert curve.cpr > old.cpr + 0.5
    assert curve.n_edges_abs == old.n_edges_abs  # the same |score| circuits (run in other batches: 1e-15)
    assert curve.cmd == pytest.approx(old.cmd, rel=1e-12)
    assert curve.faithfulness_abs == pytest.approx(old.faithfulness_abs, rel=1e-12)
    exact = atpstar.faithfulness_curve(model, pairs, results["atp+qkfix"])
    assert curve.cpr > exact.cpr  # here GradDrop's sizes rank better than the QK fix's own estimates


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_mibs_evaluation_scores_the_signed_atp_star_file(tmp_path, suffix):
    hf, model, pairs, results = _results("gpt2", 3)
    result = results["atp*"]
    path = result.to_mib(tmp_path / f"importances{suffix}")
    graph = load_circuit(str(path))
    names = result.edge_graph().edge_names
    file_scores = torch.tensor([float(graph.scores[graph.edges[n]]) for n in names], dtype=torch.float64)
    assert torch.allclose(file_scores, mib_scores(result), rtol=1e-6, atol=1e-12)
    assert bool((file_scores > 0).any()) and bool((file_scores < 0).any())
    curve = atpstar.faithfulness_curve(model, pairs, result)
    data = (pairs.clean, pairs.noise, pairs.answer, pairs.distractor)
    ref = area_under_curve(hf, load_circuit(str(path)), data, absolute=False)
    assert curve.cpr == pytest.approx(ref["area_under"], rel=1e-7)
    assert curve.cpr > 0.5


def test_a_graddrop_result_without_its_sign_is_refused(three_pairs, tmp_path):
    _, _, _, results = three_pairs
    old = dataclasses.replace(results["atp*"], extras={})
    with pytest.raises(InputError, match="rerun the method"):
        old.to_mib(tmp_path / "importances.json")


def test_sign_survives_save_and_load_and_pair_blocks(three_pairs, tmp_path):
    _, model, pairs, results = three_pairs
    result = results["atp*"]
    result.save(tmp_path / "r")
    assert torch.equal(atpstar.Attribution.load(tmp_path / "r").extras[SIGN], result.extras[SIGN])
    parts = [atpstar.attribute(model, pairs.subset([i]), method="atp*", nodes=["edge"]) for i in range(3)]
    merged = atpstar.Attribution.concat(parts)
    clear = results["atp+qkfix"].per_pair["edge"].abs() > TINY  # batches may round a zero estimate either way
    assert torch.equal(merged.extras[SIGN][clear], result.extras[SIGN][clear])
    assert torch.allclose(mib_scores(merged), mib_scores(result), rtol=1e-9, atol=1e-12)
