"""MIB circuit files: layout MIB's loader expects, round trips, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

import atpstar
from atpstar.edges.mib import load_mib, mib_scores, save_mib
from atpstar.errors import InputError
from reference.models import build_hf, load, make_pairs


@pytest.fixture(scope="module")
def result():
    model = load(build_hf("llama", n_layers=2, seed=7))
    return model, atpstar.attribute(model, make_pairs(), method="atp", nodes=["edge"])


def test_json_has_mibs_layout(result, tmp_path):
    model, attribution = result
    path = attribution.to_mib(tmp_path / "circuit.json", n_edges=10, prune=False)
    data = json.loads(path.read_text())
    assert set(data) == {"cfg", "nodes", "edges"}
    assert data["cfg"] == {"n_layers": 2, "n_heads": 4, "parallel_attn_mlp": False, "d_model": 32}
    n_heads = 4
    assert list(data["nodes"]) == ["input"] + [f"a0.h{h}" for h in range(n_heads)] + ["m0"] + [
        f"a1.h{h}" for h in range(n_heads)
    ] + ["m1", "logits"]
    assert list(data["edges"]) == atpstar.edge_names(model)
    first = data["edges"]["input->a0.h0<q>"]
    assert set(first) == {"score", "in_graph"} and isinstance(first["score"], float)
    assert sum(e["in_graph"] for e in data["edges"].values()) == 10
    scores = torch.tensor([e["score"] for e in data["edges"].values()], dtype=torch.float64)
    n_pairs = attribution.n_pairs  # fewer than MIB's batch of 20: one batch of n_pairs
    want = -attribution.per_pair["edge"].double().mean(0) / n_pairs  # MIB's sign and scale (0019)
    assert torch.allclose(scores, want, rtol=1e-6, atol=1e-12)
    assert bool((scores < 0).any()) and bool((scores > 0).any())


def test_pt_has_mibs_layout(result, tmp_path):
    model, attribution = result
    path = attribution.to_mib(tmp_path / "circuit.pt")
    data = torch.load(path, weights_only=False)
    n_forward, n_backward = 1 + 2 * (4 + 1), 2 * (3 * 4 + 1) + 1
    assert data["edges_scores"].shape == data["edges_in_graph"].shape == (n_forward, n_backward)
    assert data["nodes_in_graph"].shape == (n_forward,)
    assert data["src_nodes"][0] == "input" and data["dst_nodes"][-1] == "logits"
    assert data["dst_nodes"][:2] == ["a0.h0<q>", "a0.h1<q>"] and data["dst_nodes"][12] == "m0"
    assert int(data["edges_in_graph"].sum()) == len(atpstar.edge_names(model))  # every edge, none outside


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_round_trip(result, tmp_path, suffix):
    _, attribution = result
    path = attribution.to_mib(tmp_path / f"c{suffix}", n_edges=25)
    circuit = load_mib(path)
    assert circuit.graph == attribution.edge_graph() and circuit.d_model == 32
    assert torch.allclose(circuit.scores, mib_scores(attribution), rtol=1e-6)
    assert 0 < int(circuit.in_graph.sum()) <= 25


def test_bad_files_are_refused(result, tmp_path):
    _, attribution = result
    with pytest.raises(InputError, match=".json or .pt"):
        attribution.to_mib(tmp_path / "c.txt")
    path = attribution.to_mib(tmp_path / "c.json")
    data = json.loads(path.read_text())
    del data["edges"]["input->a0.h0<q>"]
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="missing"):
        load_mib(path)
    path.write_text(path.read_text()[:100])
    with pytest.raises(InputError, match="truncated"):
        load_mib(path)
    graph = attribution.edge_graph()
    with pytest.raises(InputError, match="shape"):
        save_mib(tmp_path / "x.json", graph, 32, torch.zeros(3))


def test_top_names_and_rows(result):
    _, attribution = result
    top = attribution.top(3, node_types=["edge"])
    assert top[0].name in atpstar.edge_names(result[0]) and top[0].node_type == "edge"
    assert attribution.to_rows(2)[0]["name"] == top[0].name
