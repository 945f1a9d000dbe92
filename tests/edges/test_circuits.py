"""Circuit forwards, top-k circuits with MIB's pruning, faithfulness, CPR and CMD."""

from __future__ import annotations

import pytest
import torch

import atpstar
from atpstar.cost import Cost
from atpstar.edges.circuit_run import circuit_metric
from atpstar.edges.circuits import MIB_FRACTIONS, areas, faithfulness_curve, prune_circuit, top_edges
from atpstar.edges.graph import EdgeGraph, graph_of
from atpstar.edges.patching import prepare_edges
from atpstar.runner import Run
from reference.models import build_hf, load, make_pairs


@pytest.fixture(scope="module", params=("gpt2", "gpt_neox", "llama"))
def setup(request):
    model = load(build_hf(request.param, n_layers=2, seed=5))
    pairs = make_pairs(n_pairs=2, seq_len=6, seed=6)
    graph = graph_of(model)
    cache = prepare_edges(model, graph, pairs, "noising", Cost())
    source = cache.base_senders + cache.delta
    return model, pairs, graph, cache, source


def metric_of_run(model, tokens, pairs, patch=None):
    with torch.no_grad():
        final = model.run_layers(model.embed(tokens), Run(model.n_layers, patch=patch))
        return pairs.evaluate_metric(model.unembed(final[:, -1]), torch.arange(pairs.n_pairs))


def test_no_edge_absent_is_the_base_run_and_all_absent_the_source_run(setup):
    model, pairs, graph, cache, source = setup
    pair_i = torch.arange(pairs.n_pairs)
    none = torch.zeros(pairs.n_pairs, graph.n_senders, graph.n_receivers, dtype=torch.bool)
    every = graph.valid[None].expand(pairs.n_pairs, -1, -1)
    assert torch.allclose(circuit_metric(model, cache, source, pair_i, none, Cost()), cache.base_metric, atol=1e-12)
    want = metric_of_run(model, pairs.noise, pairs)
    assert torch.allclose(circuit_metric(model, cache, source, pair_i, every, Cost()), want, rtol=1e-10, atol=1e-10)


def test_one_absent_edge_is_exact_edge_patching(setup):
    model, pairs, graph, cache, source = setup
    exact = atpstar.attribute(model, pairs, method="activation_patching", nodes=["edge"]).per_pair["edge"]
    picks = torch.randperm(graph.n_edges, generator=torch.Generator().manual_seed(0))[:12]
    for e in picks.tolist():
        absent = torch.zeros(pairs.n_pairs, graph.n_senders, graph.n_receivers, dtype=torch.bool)
        absent[:, graph.sender_index[e], graph.receiver_index[e]] = True
        got = circuit_metric(model, cache, source, torch.arange(pairs.n_pairs), absent, Cost()) - cache.base_metric
        assert torch.allclose(got, exact[:, e], rtol=1e-9, atol=1e-11), graph.edge_names[e]


def test_all_edges_of_a_head_absent_is_patching_the_head(setup):
    """Every outgoing edge of a{0}.h{1} at its source value = the head's z patched to source everywhere."""
    model, pairs, graph, cache, source = setup
    sender = graph.head_sender(0, 1)
    absent = torch.zeros(pairs.n_pairs, graph.n_senders, graph.n_receivers, dtype=torch.bool)
    absent[:, sender] = graph.valid[sender]
    got = circuit_metric(model, cache, source, torch.arange(pairs.n_pairs), absent, Cost())
    with torch.no_grad():
        noise_run = Run(model.n_layers, record=("z",))
        model.run_layers(model.embed(pairs.noise), noise_run)
    noise_z = noise_run.get("z", 0)

    def patch(layer, site, x, run):
        if layer == 0 and site == "z":
            x = x.clone()
            x[:, 1] = noise_z[:, 1]
        return x

    assert torch.allclose(got, metric_of_run(model, pairs.clean, pairs, patch), rtol=1e-10, atol=1e-10)


def test_top_edges_and_pruning():
    graph = EdgeGraph(2, 2, False)
    scores = torch.zeros(graph.n_edges)
    names = graph.edge_names
    scores[names.index("a0.h1->a1.h0<q>")] = 5.0  # a0.h1 has no incoming edge: pruned away
    scores[names.index("input->a0.h0<v>")] = -4.0
    scores[names.index("a0.h0->logits")] = 3.0
    chosen = top_edges(graph, scores, 3, prune=False)
    assert int(chosen.sum()) == 3
    pruned = top_edges(graph, scores, 3)
    kept = {names[i] for i in torch.nonzero(pruned)[:, 0].tolist()}
    assert kept == {"input->a0.h0<v>", "a0.h0->logits"}
    assert torch.equal(prune_circuit(graph, pruned), pruned)


def test_areas_by_hand():
    cpr, cmd = areas([0.0, 0.5, 1.0], [0.0, 0.5, 1.0])
    assert cpr == pytest.approx(0.5) and cmd == pytest.approx(0.5)
    cpr, cmd = areas([0.1, 0.2], [2.0, 0.0])
    assert cpr == pytest.approx(0.1) and cmd == pytest.approx(0.1)


def test_faithfulness_curve_recomputes_from_its_numbers(setup):
    model, pairs, graph, _, _ = setup
    result = atpstar.attribute(model, pairs, method="atp", nodes=["edge"])
    curve = faithfulness_curve(model, pairs, result)
    assert curve.fractions == list(MIB_FRACTIONS) and curve.method == "atp"
    full, empty = curve.metric_full, curve.metric_empty
    for f, m in zip(curve.faithfulness, curve.metric_circuit):
        assert f == pytest.approx((m - empty) / (full - empty))
    for f, m in zip(curve.faithfulness_abs, curve.metric_circuit_abs):
        assert f == pytest.approx((m - empty) / (full - empty))
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-9)  # every edge kept: the base run
    assert curve.faithfulness_abs[-1] == pytest.approx(1.0, abs=1e-9)
    # MIB's leaderboard: CPR from the signed ranking's curve, CMD from the |score| ranking's (0019)
    assert curve.cpr == pytest.approx(areas(curve.fractions, curve.faithfulness)[0])
    assert curve.cmd == pytest.approx(areas(curve.fractions, curve.faithfulness_abs)[1])
    assert curve.n_edges[-1] == curve.n_edges_abs[-1] == graph.n_edges
