"""Round trip: MIB files written by atpstar, read and evaluated by a re-implementation of MIB's own code
(``mib_reference``, written from MIB's definitions), give the circuits and the CPR/CMD atpstar reports."""

from __future__ import annotations

import pytest
import torch
from mib_reference import FRACTIONS, area_under_curve, load_circuit

import atpstar
from atpstar.edges.circuits import top_edges
from atpstar.edges.mib import mib_scores
from reference.models import build_hf, load, make_pairs


@pytest.fixture(scope="module")
def gpt2():
    hf_model = build_hf("gpt2", n_layers=2, seed=21)
    model = load(hf_model)
    pairs = make_pairs(n_pairs=3, seq_len=6, seed=22)
    return hf_model, model, pairs


def data_of(pairs):
    return pairs.clean, pairs.noise, pairs.answer, pairs.distractor


@pytest.mark.parametrize("method", ["atp", "atp*", "activation_patching"])
@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_mibs_evaluation_of_atpstars_file_gives_atpstars_circuits_and_areas(gpt2, tmp_path, method, suffix):
    hf_model, model, pairs = gpt2
    result = atpstar.attribute(model, pairs, method=method, nodes=["edge"])
    path = result.to_mib(tmp_path / f"importances{suffix}")
    graph = load_circuit(str(path))
    names = result.edge_graph().edge_names
    assert len(graph.edges) == len(names) and set(graph.edges) == set(names)
    scores = mib_scores(result)
    file_scores = torch.tensor([float(graph.scores[graph.edges[n]]) for n in names], dtype=torch.float64)
    assert torch.allclose(file_scores, scores, rtol=1e-6, atol=1e-12)  # .pt holds float32
    assert bool((file_scores < 0).any()), "MIB's signed scores have both signs"
    curve = atpstar.faithfulness_curve(model, pairs, result)
    edge_graph = result.edge_graph()
    for absolute, faithfulness in ((False, curve.faithfulness), (True, curve.faithfulness_abs)):
        ref = area_under_curve(hf_model, load_circuit(str(path)), data_of(pairs), absolute)
        for k, fraction in enumerate(FRACTIONS):
            chosen = top_edges(edge_graph, file_scores, int(fraction * len(names)), absolute=absolute)
            mine = {names[i] for i in torch.nonzero(chosen)[:, 0].tolist()}
            assert mine == ref["circuits"][k], (absolute, fraction)
        assert faithfulness == pytest.approx(ref["faithfulnesses"], rel=1e-7, abs=1e-9)
        if absolute:
            assert curve.cmd == pytest.approx(ref["area_from_1"], rel=1e-7)
            assert curve.n_edges_abs == ref["weighted_edge_counts"]
        else:
            assert curve.cpr == pytest.approx(ref["area_under"], rel=1e-7)
            assert curve.n_edges == ref["weighted_edge_counts"]


def test_mib_scale_is_minus_the_mean_over_the_batch(gpt2):
    _, model, pairs = gpt2
    result = atpstar.attribute(model, pairs, method="atp", nodes=["edge"])
    per_pair = result.per_pair["edge"].double()
    assert torch.allclose(mib_scores(result), -per_pair.mean(0) / 3)  # one batch of 3
    assert torch.allclose(mib_scores(result, batch_size=2), -(per_pair[:2].sum(0) / 2 + per_pair[2]) / 3)
    exact = atpstar.attribute(model, pairs, method="activation_patching", nodes=["edge"])
    effects = exact.per_pair["edge"].double()
    assert torch.allclose(mib_scores(exact, batch_size=2), -(effects[:2].mean(0) + effects[2]) / 2)
