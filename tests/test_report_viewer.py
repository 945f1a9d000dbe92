"""The data the viewer draws: an edge result's graph and circuits, heatmaps, the graph format's check, and a
report that stays one file that fetches nothing (the browser tests in tests/browser open it)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import atpstar
from atpstar.edges.circuits import faithfulness_curve, signed_importance, top_edges
from atpstar.edges.graph import EdgeGraph
from atpstar.errors import InputError
from atpstar.plots import contribution_maps
from atpstar.report import write_report
from atpstar.testing.fixtures import tiny_model, tiny_pairs
from atpstar.verify import verify
from atpstar.viewer import check_graph, edge_graph_json, embed_json, heatmaps_json


@pytest.fixture(scope="module")
def edges():
    model, pairs = tiny_model(), tiny_pairs()
    estimate = atpstar.attribute(model, pairs, method="atp", nodes=["edge"])
    return model, pairs, estimate


def test_circuits_are_the_curves_circuits_and_node_scores_sum_the_edges(edges):
    model, pairs, estimate = edges
    fractions = [0.02, 0.1, 0.5, 1.0]
    curve = faithfulness_curve(model, pairs, estimate, fractions)
    data = edge_graph_json(estimate, curve=curve)
    graph = EdgeGraph.from_description(estimate.info["edge_graph"])
    names = graph.edge_names
    for i, circuit in enumerate(data["circuits"]):
        assert circuit["n_edges"] == curve.n_edges[i] == len(circuit["edges"])
        assert circuit["faithfulness"] == pytest.approx(curve.faithfulness[i])
        # the CPR circuits: MIB's signed ranking, as the curve's n_edges and faithfulness
        want = top_edges(graph, signed_importance(estimate), int(fractions[i] * graph.n_edges), absolute=False)
        drawn = {data["edges"][e]["name"] for e in circuit["edges"]}
        assert drawn == {names[e] for e in want.nonzero()[:, 0].tolist()}
    assert {e["source"] for e in data["edges"]} | {e["target"] for e in data["edges"]} <= {n["id"] for n in data["nodes"]}
    per_pair = estimate.per_pair["edge"].double()  # [P, N]
    outgoing = per_pair[:, graph.sender_index == 0].sum(1).abs().mean()  # atp aggregates mean |.| over pairs
    assert data["nodes"][0]["name"] == "input" and data["nodes"][0]["score"] == pytest.approx(float(outgoing))
    assert check_graph(json.loads(json.dumps(data))) is not None


def test_a_large_circuit_draws_its_strongest_edges_only(edges):
    _, _, estimate = edges
    data = edge_graph_json(estimate, fractions=[0.5, 1.0], prune=False, max_drawn=7)
    scores = estimate.scores["edge"]
    graph = EdgeGraph.from_description(estimate.info["edge_graph"])
    names = graph.edge_names
    assert [c["n_edges"] for c in data["circuits"]] == [int(0.5 * scores.numel()), scores.numel()]
    by_strength = torch.sort(scores.abs(), descending=True, stable=True).indices.tolist()
    for fraction, circuit in zip([0.5, 1.0], data["circuits"]):
        chosen = top_edges(graph, signed_importance(estimate), int(fraction * graph.n_edges), False, absolute=False)
        strongest = [e for e in by_strength if chosen[e]][:7]  # the circuit's 7 strongest edges, strongest first
        assert [data["edges"][e]["name"] for e in circuit["edges"]] == [names[e] for e in strongest]


def test_verified_edges_carry_their_exact_effect(edges):
    model, pairs, estimate = edges
    verified = verify(model, pairs, estimate, budget=3)
    data = edge_graph_json(estimate, verified=verified, fractions=[1.0])
    exact = {e["name"]: e["exact"] for e in data["edges"] if "exact" in e}
    assert len(exact) == 3
    for (_, index), effects in zip(verified.nodes, verified.effects):
        assert exact[estimate.spaces().name("edge", index)] == pytest.approx(float(effects.double().mean()))


def test_heatmaps_sum_like_the_static_plots_and_name_the_strongest_node():
    model, pairs = tiny_model(), tiny_pairs()
    estimate = atpstar.attribute(model, pairs, method="atp", nodes=["head", "neuron"])
    maps = heatmaps_json(estimate, tokens=["t"] * pairs.seq_len)
    found = [(m["node_type"], m["column_axis"]) for m in maps]
    assert sorted(found) == [("head", "head"), ("head", "pos"), ("neuron", "pos")]
    for m in maps:
        want = contribution_maps(estimate, m["node_type"])[f"layer x {m['column_axis']}"]
        np.testing.assert_allclose(np.array(m["values"]), want, rtol=1e-12)
    head_map = maps[found.index(("head", "head"))]
    scores = estimate.scores["head"]  # [L, H, T]
    layer, head = 1, 2
    pos = int(scores[layer, head].abs().argmax())
    assert head_map["top"][layer][head][0] == estimate.spaces().name("head", (layer, head, pos))
    assert head_map["top"][layer][head][1] == pytest.approx(float(scores[layer, head, pos]))
    assert maps[found.index(("head", "pos"))]["columns"][0] == "pos 0 't'"
    verified = verify(model, pairs, estimate, budget=6)
    for m in heatmaps_json(estimate, verified):
        exact = [float(e.double().mean()) for (t, _), e in zip(verified.nodes, verified.effects) if t == m["node_type"]]
        counts = [c for row in m["verified"] for c in row]
        assert sum(n for n, _ in counts) == len(exact)
        assert sum(total for n, total in counts if n) == pytest.approx(sum(exact))


def test_check_graph_refuses_what_cannot_be_drawn():
    good = {"nodes": [{"id": "a", "layer": 0}, {"id": "b", "layer": 1}], "edges": [{"source": "a", "target": "b", "weight": 1}]}
    assert check_graph(good) is good
    with pytest.raises(InputError, match="'nodes' list"):
        check_graph([1, 2])
    with pytest.raises(InputError, match="numeric 'layer'"):
        check_graph({"nodes": [{"id": "a", "layer": "top"}], "edges": []})
    assert check_graph({"nodes": [{"id": "metric", "layer": None}], "edges": []})  # an output row
    with pytest.raises(InputError, match="'c', which is no node"):
        check_graph({"nodes": good["nodes"], "edges": [{"source": "a", "target": "c", "weight": 1}]})
    with pytest.raises(InputError, match="numeric 'weight'"):
        check_graph({"nodes": good["nodes"], "edges": [{"source": "a", "target": "b", "weight": "big"}]})


def test_embedded_json_cannot_close_its_script_element():
    text = embed_json("x", {"name": "</script><script>alert(1)</script>"})
    assert text.count("</script>") == 1 and json.loads(text[text.index(">") + 1 : -len("</script>")])["name"].startswith("</")


def test_a_feature_graph_and_an_edge_result_make_one_self_contained_page(edges, tmp_path):
    _, _, estimate = edges
    latents = {
        "title": "feature circuit",
        "nodes": [{"id": f"res{layer}/{i}", "dictionary": f"res{layer}", "layer": layer, "index": i, "position": 3, "score": 0.1 * i}
                  for layer in range(2) for i in range(3)],
        "edges": [{"source": f"res0/{i}", "target": f"res1/{j}", "weight": i - j} for i in range(3) for j in range(3)],
    }
    path = write_report(tmp_path / "report.html", [estimate], graphs=[edge_graph_json(estimate), latents])
    page = path.read_text()
    assert page.count("class='atp-graph'") == 2 and "Content-Security-Policy" in page and "<script>" in page
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:|//)", page) and "http" not in page.replace("http-equiv", "")
    with pytest.raises(InputError):
        write_report(tmp_path / "bad.html", [], graphs=[{"nodes": [{"id": 1, "layer": "first"}]}])
