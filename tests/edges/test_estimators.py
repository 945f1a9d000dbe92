"""Every edge method against brute-force path patching of its definition (``reference.edges``), float64,
on tiny random GPT-2, GPT-NeoX (parallel residual) and Llama-GQA models."""

from __future__ import annotations

import pytest
import torch

import atpstar
from atpstar.edges.graph import graph_of
from reference.edges import edge_references, qk_fix_references
from reference.models import assert_rel_close, build_hf, load, make_pairs

FAMILIES = ("gpt2", "gpt_neox", "llama")


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    hf = build_hf(request.param, n_layers=2, seed=3)
    model = load(hf)
    pairs = make_pairs(n_pairs=2, seq_len=6, seed=4)
    graph = graph_of(model)
    refs = {
        drop: edge_references(hf, pairs, graph.edge_names, graph.sender_names, drop_layer=drop)
        for drop in (None, *range(model.n_layers))
    }

    def qk_fixed(drop):
        values = refs[drop]["eap"].clone()
        for i, v in qk_fix_references(hf, model, pairs, graph.edge_names, graph.sender_names, drop).items():
            values[:, i] = v
        return values

    return hf, model, pairs, graph, refs, qk_fixed


def run(model, pairs, method, **options):
    result = atpstar.attribute(model, pairs, method=method, nodes=["edge"], **options)
    assert result.per_pair["edge"].shape == (pairs.n_pairs, len(atpstar.edge_names(model)))
    return result.per_pair["edge"]


def test_exact_edge_patching(setup):
    _, model, pairs, _, refs, _ = setup
    assert_rel_close(run(model, pairs, "activation_patching", batch_size=7), refs[None]["exact"], 1e-10, "exact")


def test_eap(setup):
    _, model, pairs, _, refs, _ = setup
    assert_rel_close(run(model, pairs, "atp"), refs[None]["eap"], 1e-10, "EAP")


def test_eap_ig(setup):
    hf, model, pairs, graph, _, _ = setup
    want = edge_references(hf, pairs, graph.edge_names, graph.sender_names, ig_steps=3)["eap"]
    assert_rel_close(run(model, pairs, "atp+ig", ig_steps=3), want, 1e-10, "EAP-IG")


def test_graddrop(setup):
    _, model, pairs, _, refs, _ = setup
    want = sum(refs[drop]["eap"].abs() for drop in range(model.n_layers)) / (model.n_layers - 1)
    assert_rel_close(run(model, pairs, "atp+graddrop"), want, 1e-10, "GradDrop")


def test_qk_fix_and_atp_star(setup):
    # The QK-fix reference reads A' from transformers' eager attention formula with a float64 softmax.
    _, model, pairs, _, _, qk_fixed = setup
    assert_rel_close(run(model, pairs, "atp+qkfix"), qk_fixed(None), 1e-10, "QK fix")
    want = sum(qk_fixed(drop).abs() for drop in range(model.n_layers)) / (model.n_layers - 1)
    assert_rel_close(run(model, pairs, "atp*"), want, 1e-10, "AtP*")


def test_qk_fix_changes_only_query_and_key_edges(setup):
    _, model, pairs, graph, _, _ = setup
    plain, fixed = run(model, pairs, "atp"), run(model, pairs, "atp+qkfix")
    qk = torch.tensor([n.endswith("<q>") or n.endswith("<k>") for n in graph.edge_names])
    assert torch.equal(plain[:, ~qk], fixed[:, ~qk])
    assert not torch.allclose(plain[:, qk], fixed[:, qk])


def test_denoising_direction(setup):
    hf, model, pairs, graph, _, _ = setup
    want = edge_references(hf, pairs, graph.edge_names, graph.sender_names, direction="denoising")
    result = atpstar.attribute(model, pairs, method="activation_patching", nodes=["edge"], direction="denoising")
    assert_rel_close(result.per_pair["edge"], want["exact"], 1e-10, "exact, denoising")


def test_verify_edges_in_estimate_order(setup, tmp_path):
    _, model, pairs, graph, refs, _ = setup
    estimate = atpstar.attribute(model, pairs, method="atp", nodes=["edge"])
    verified = atpstar.verify(model, pairs, estimate, budget=8)
    order = torch.sort(estimate.scores["edge"].abs(), descending=True, stable=True).indices[:8]
    assert [index[0] for _, index in verified.nodes] == order.tolist()
    assert_rel_close(verified.effects, refs[None]["exact"][:, order].T, 1e-10, "verified edges")
    assert verified.names == [graph.edge_names[i] for i in order.tolist()]
    verified.save(tmp_path / "v")
    assert atpstar.Verification.load(tmp_path / "v").names == verified.names


@pytest.mark.parametrize("method", ["atp", "atp*", "atp+ig"])
def test_out_of_memory_halves_the_edge_batch_and_keeps_the_numbers(setup, method, monkeypatch):
    from atpstar.edges import atpstar as edge_atpstar
    from atpstar.edges import eap as edge_eap
    from test_batching import oom_above

    _, model, pairs, _, _, _ = setup
    want = run(model, pairs, method, batch_size=2)
    target = (edge_atpstar, "edge_atp") if method == "atp*" else (edge_eap, "eap")
    flaky = oom_above(1, lambda batch, *rest: len(batch.index))(getattr(*target))
    monkeypatch.setattr(*target, flaky)
    with pytest.warns(UserWarning, match="edge attribution: pairs: out of memory .* batch of 2; halved it to 1"):
        result = atpstar.attribute(model, pairs, method=method, nodes=["edge"], batch_size=2)
    assert flaky.calls == [2, 1, 1] and result.info["edge_oom_retries"] == 1
    assert_rel_close(result.per_pair["edge"], want, 1e-12, f"{method} after a retry")


def test_keep_top_says_edges_stay_dense(setup):
    _, model, pairs, _, refs, _ = setup
    with pytest.warns(UserWarning, match=r"keep='top' applies to site node types; \['edge'\] results are kept dense"):
        result = atpstar.attribute(model, pairs, method="atp", nodes=["neuron", "edge"], keep="top", top_k=3)
    assert result.per_pair["neuron"].is_sparse and not result.per_pair["edge"].is_sparse
    assert_rel_close(result.per_pair["edge"], refs[None]["eap"], 1e-10, "EAP next to top-k neurons")
