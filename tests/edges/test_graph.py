"""The edge graph: MIB/EAP-IG names, order, counts and which edges exist."""

from __future__ import annotations

import pytest
import torch

import atpstar
from atpstar.edges.graph import EdgeGraph, graph_of
from reference.models import build_hf, load


def expected_count(n_layers: int, n_heads: int, parallel: bool) -> int:
    total = 0
    for layer in range(n_layers):
        upstream = 1 + layer * (n_heads + 1)
        total += upstream * 3 * n_heads + upstream + (0 if parallel else n_heads)
    return total + 1 + n_layers * (n_heads + 1)


@pytest.mark.parametrize("parallel", [False, True])
def test_counts_and_first_names(parallel):
    graph = EdgeGraph(3, 4, parallel)
    names = graph.edge_names
    assert len(names) == len(set(names)) == graph.n_edges == expected_count(3, 4, parallel)
    assert names[:4] == ["input->a0.h0<q>", "input->a0.h0<k>", "input->a0.h0<v>", "input->a0.h1<q>"]
    assert names[-1] == "m2->logits"
    assert graph.sender_names[:2] == ["input", "a0.h0"] and graph.sender_names[5] == "m0"
    assert graph.receiver_names[:5] == ["a0.h0<q>", "a0.h1<q>", "a0.h2<q>", "a0.h3<q>", "a0.h0<k>"]
    assert graph.receiver_names[12:14] == ["m0", "a1.h0<q>"] and graph.receiver_names[-1] == "logits"
    assert ("a0.h1->m0" in names) is (not parallel)
    assert "a1.h0->a1.h2<q>" not in names and "m1->a1.h0<q>" not in names and "a0.h3->m1" in names


def test_edges_point_downstream_only():
    graph = EdgeGraph(2, 3, False)
    layer_of_sender = [-1] + [l for l in range(2) for _ in range(4)]
    for s, r in zip(graph.sender_index.tolist(), graph.receiver_index.tolist()):
        sender_layer, receiver_layer = layer_of_sender[s], graph.receiver_layer(r)
        is_own_mlp = r == graph.mlp_receiver(max(sender_layer, 0)) and s != graph.mlp_sender(max(sender_layer, 0))
        assert sender_layer < receiver_layer or (sender_layer == receiver_layer and is_own_mlp)
    matrix = graph.to_matrix(torch.arange(graph.n_edges, dtype=torch.float64), fill=-1)
    assert torch.equal(graph.from_matrix(matrix), torch.arange(graph.n_edges, dtype=torch.float64))
    assert int((matrix >= 0).sum()) == graph.n_edges == int(graph.valid.sum())


def test_model_graphs_follow_family_and_ungroup_gqa():
    llama = load(build_hf("llama"))  # 4 query heads, 2 kv heads
    names = atpstar.edge_names(llama)
    assert "input->a0.h3<k>" in names and "a0.h1->m0" in names
    neox = graph_of(load(build_hf("gpt_neox")))
    assert neox.parallel and "a0.h1->m0" not in neox.edge_names
    sequential = graph_of(load(build_hf("gpt_neox", use_parallel_residual=False)))
    assert not sequential.parallel and "a0.h1->m0" in sequential.edge_names
