"""MIB-schema pairs of unequal length through every edge method, verify, the bound and find, against
per-example brute force in float64 on tiny random GPT-2 and Llama-GQA models (``reference.edges``)."""

from __future__ import annotations

import mib_fixtures as fx
import pytest
import torch

import atpstar
from atpstar.edges.graph import graph_of
from atpstar.result import aggregate
from reference.edges import edge_references
from reference.models import assert_rel_close, build_hf, load

POSITIONS = {"gpt2": "n_positions", "llama": "max_position_embeddings"}


@pytest.fixture(scope="module", params=sorted(POSITIONS))
def setup(request, tmp_path_factory):
    hf = build_hf(request.param, n_layers=2, seed=3, **{POSITIONS[request.param]: 40})
    model = load(hf)
    tok = fx.tokenizer()
    folder = tmp_path_factory.mktemp("mib")
    ioi = atpstar.tasks.mib("ioi", "validation", tokenizer=tok, path=fx.write(folder / "ioi", "ioi", "jsonl"))
    mcqa = atpstar.tasks.mib("mcqa", "test", tokenizer=tok, path=fx.write(folder / "mcqa", "mcqa", "jsonl"), n=2)
    graph = graph_of(model)
    singles = {name: [p.subset([i]) for i in range(p.n_pairs)] for name, p in (("ioi", ioi), ("mcqa", mcqa))}
    refs = {
        name: [edge_references(hf, s, graph.edge_names, graph.sender_names) for s in pairs]
        for name, pairs in singles.items()
    }
    eap = {name: {k: torch.cat([r[k] for r in rs]) for k in ("exact", "eap")} for name, rs in refs.items()}
    return model, {"ioi": ioi, "mcqa": mcqa}, singles, eap


def test_fixture_pairs_have_several_lengths(setup):
    _, pairsets, _, _ = setup
    for pairs in pairsets.values():
        assert isinstance(pairs, atpstar.PairSet) and len(pairs.groups) >= 2
        assert len(set(pairs.lengths.tolist())) >= 2


@pytest.mark.parametrize("name", ["ioi", "mcqa"])
@pytest.mark.parametrize("method, key", [("activation_patching", "exact"), ("atp", "eap")])
def test_exact_and_eap_agree_with_brute_force_per_example(setup, name, method, key):
    model, pairsets, _, refs = setup
    result = atpstar.attribute(model, pairsets[name], method=method, nodes=["edge"])
    assert_rel_close(result.per_pair["edge"], refs[name][key], 1e-10, f"{method} on {name}")
    assert torch.equal(result.scores["edge"], aggregate(result.per_pair, result.aggregation)["edge"])


def test_eap_ig_agrees_with_brute_force_per_example(setup):
    model, pairsets, singles, _ = setup
    hf = model.hf_model
    graph = graph_of(model)
    result = atpstar.attribute(model, pairsets["ioi"], method="atp+ig", nodes=["edge"], ig_steps=3)
    refs = [edge_references(hf, s, graph.edge_names, graph.sender_names, ig_steps=3)["eap"] for s in singles["ioi"]]
    assert_rel_close(result.per_pair["edge"], torch.cat(refs), 1e-10, "EAP-IG")


@pytest.mark.parametrize("method", ["atp+qkfix", "atp+graddrop", "atp*", "atp+ig", "activation_patching"])
def test_every_edge_method_is_the_per_example_result_and_cost_adds_up(setup, method):
    model, pairsets, singles, _ = setup
    pairs = pairsets["mcqa"]
    result = atpstar.attribute(model, pairs, method=method, nodes=["edge"])
    alone = [atpstar.attribute(model, s, method=method, nodes=["edge"]) for s in singles["mcqa"]]
    assert_rel_close(result.per_pair["edge"], torch.cat([a.per_pair["edge"] for a in alone]), 1e-10, method)
    groups = [atpstar.attribute(model, g, method=method, nodes=["edge"]) for g in pairs.groups]
    assert result.cost.forward == pytest.approx(sum(g.cost.forward for g in groups))
    assert result.cost.backward == pytest.approx(sum(g.cost.backward for g in groups))
    assert result.info["n_pairs"] == pairs.n_pairs


def test_verify_effects_are_the_exact_per_example_effects(setup):
    model, pairsets, _, refs = setup
    estimate = atpstar.attribute(model, pairsets["ioi"], method="atp", nodes=["edge"])
    checked = atpstar.verify(model, pairsets["ioi"], estimate, budget=6)
    index = torch.tensor([i[0] for _, i in checked.nodes])
    assert checked.effects.shape == (6, pairsets["ioi"].n_pairs)
    assert_rel_close(checked.effects, refs["ioi"]["exact"][:, index].T, 1e-10, "verify")
    assert checked.cost.forward > 0


def test_bound_merges_the_groups_per_pair_statistics(setup):
    model, pairsets, _, _ = setup
    pairs = pairsets["ioi"]
    options = dict(theta=0.5, samples=6, p=0.3, seed=2, nodes=["edge"])
    merged = atpstar.false_negative_bound(model, pairs, [], **options)
    parts = [atpstar.false_negative_bound(model, g, [], **options) for g in pairs.groups]
    weights = torch.tensor([g.n_pairs / pairs.n_pairs for g in pairs.groups], dtype=torch.float64)
    expected = sum(w * part.estimate["edge"] for w, part in zip(weights, parts))
    assert_rel_close(merged.estimate["edge"], expected, 1e-10, "bound estimate")
    assert merged.cost.forward == pytest.approx(sum(part.cost.forward for part in parts))


def test_find_on_edges_verifies_exact_effects(setup):
    model, pairsets, _, refs = setup
    exact = refs["ioi"]["exact"].mean(0)
    theta = 0.6 * float(exact.abs().max())  # at least the largest edge is found
    found = atpstar.find(model, pairsets["ioi"], theta, nodes=["edge"], estimator="atp", max_rounds=1)
    assert found.nodes and found.cost
    for (_, index), effect in zip(found.nodes, found.effects):
        assert float(effect) == pytest.approx(float(exact[index[0]]), abs=1e-10)


def test_position_resolved_nodes_are_refused_on_several_lengths(setup):
    model, pairsets, _, _ = setup
    with pytest.raises(atpstar.InputError, match="position axis"):
        atpstar.attribute(model, pairsets["ioi"], method="atp", nodes=["head"])
    with pytest.raises(atpstar.InputError, match="position axis"):
        atpstar.attribute(model, pairsets["ioi"], method="atp", nodes=["edge"], edge_positions=True)
    estimate = atpstar.attribute(model, pairsets["ioi"], method="atp", nodes=["edge"])
    with pytest.raises(atpstar.InputError, match="in-process"):  # attribute runs them (tests/mib/test_pairset_workers)
        atpstar.verify(model, pairsets["ioi"], estimate, budget=2, workers=2)


def test_faithfulness_curve_is_the_mean_over_every_pair_of_every_group(setup):
    model, pairsets, _, _ = setup
    pairs = pairsets["ioi"]
    estimate = atpstar.attribute(model, pairs, method="atp", nodes=["edge"])
    scores = -estimate.per_pair["edge"].mean(0)  # MIB's sign
    fractions = [0.0, 0.05, 0.2, 1.0]
    curve = atpstar.faithfulness_curve(model, pairs, scores, fractions)
    parts = [atpstar.faithfulness_curve(model, g, scores, fractions) for g in pairs.groups]
    weights = [g.n_pairs / pairs.n_pairs for g in pairs.groups]
    for key in ("metric_circuit", "metric_circuit_abs"):
        expected = [sum(w * getattr(p, key)[k] for w, p in zip(weights, parts)) for k in range(len(fractions))]
        assert getattr(curve, key) == pytest.approx(expected, abs=1e-10)
    assert curve.metric_full == pytest.approx(sum(w * p.metric_full for w, p in zip(weights, parts)), abs=1e-10)


def test_evaluate_compares_merged_edge_results(setup):
    model, pairsets, _, _ = setup
    pairs = pairsets["mcqa"]
    truth = atpstar.attribute(model, pairs, method="activation_patching", nodes=["edge"])
    estimates = [atpstar.attribute(model, pairs, method=m, nodes=["edge"]) for m in ("atp", "atp*")]
    comparison = atpstar.evaluate(truth, estimates, setting="per_pair")
    assert "atp*" in comparison.to_markdown()
