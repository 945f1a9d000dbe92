"""Edges on the newer families, each against brute-force path patching (``reference.edges``), float64:
Qwen3 (per-head QK-norm, sliding window on some layers), Mistral (sliding window, GQA), Phi-3 (fused
qkv_proj and gate_up_proj, sliding window, partial rotary), Gemma-2 (soft-cap, alternating windows,
pre- and post-norms, scaled embeddings), Gemma-3 (+ per-head QK-norm, local/global rotary) and OLMo-2
(post-norms only, QK-norm over the whole projection). Post-norm families: a head's sender output is its
share W_O^h z_h * norm(a) / a of the normalised attention write (``atpstar.edges.sites``)."""

from __future__ import annotations

import pytest
import torch

import atpstar
from atpstar.cost import Cost
from atpstar.edges.circuit_run import circuit_metric
from atpstar.edges.graph import graph_of
from atpstar.edges.patching import prepare_edges
from atpstar.runner import Run
from reference.edges import edge_references, qk_fix_references
from reference.models import assert_rel_close, build_hf, load, make_pairs

FAMILIES = ("qwen3", "mistral", "phi3", "gemma2", "gemma3", "olmo2")
REL = 1e-10


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    hf = build_hf(request.param, n_layers=2, seed=3)
    model = load(hf)
    pairs = make_pairs(n_pairs=1, seq_len=6, seed=4)  # batches of pairs: tests/edges/test_estimators.py
    graph = graph_of(model)
    names = (graph.edge_names, graph.sender_names)
    refs = {drop: edge_references(hf, pairs, *names, drop_layer=drop) for drop in (None, *range(model.n_layers))}

    def qk_fixed(drop):
        values = refs[drop]["eap"].clone()
        for i, v in qk_fix_references(hf, model, pairs, *names, drop).items():
            values[:, i] = v
        return values

    return request.param, model, pairs, refs, qk_fixed


def run(model, pairs, method, **options):
    return atpstar.attribute(model, pairs, method=method, nodes=["edge"], **options).per_pair["edge"]


def test_exact_edge_patching(setup):
    family, model, pairs, refs, _ = setup
    assert float(refs[None]["exact"].abs().max()) > 1e-3
    assert_rel_close(run(model, pairs, "activation_patching", batch_size=9), refs[None]["exact"], REL, family)


def test_eap_and_graddrop(setup):
    family, model, pairs, refs, _ = setup
    assert_rel_close(run(model, pairs, "atp"), refs[None]["eap"], REL, f"{family} EAP")
    want = sum(refs[drop]["eap"].abs() for drop in range(model.n_layers)) / (model.n_layers - 1)
    assert_rel_close(run(model, pairs, "atp+graddrop"), want, REL, f"{family} GradDrop")


def test_eap_ig(setup):
    family, model, pairs, _, _ = setup
    hf = model.hf_model
    graph = graph_of(model)
    want = edge_references(hf, pairs, graph.edge_names, graph.sender_names, ig_steps=2)["eap"]
    assert_rel_close(run(model, pairs, "atp+ig", ig_steps=2), want, REL, f"{family} EAP-IG")


def test_qk_fix_and_atp_star(setup):
    family, model, pairs, _, qk_fixed = setup
    assert_rel_close(run(model, pairs, "atp+qkfix"), qk_fixed(None), REL, f"{family} QK fix")
    want = sum(qk_fixed(drop).abs() for drop in range(model.n_layers)) / (model.n_layers - 1)
    assert_rel_close(run(model, pairs, "atp*"), want, REL, f"{family} AtP*")


def test_circuit_forward_spans_base_to_source_run(setup):
    # MIB's circuit forward: no edge at its source value = the base run; all of them = the source run.
    family, model, pairs, refs, _ = setup
    graph = graph_of(model)
    cache = prepare_edges(model, graph, pairs, "noising", Cost())
    source = cache.base_senders + cache.delta
    pair_i = torch.arange(pairs.n_pairs)
    none = torch.zeros(pairs.n_pairs, graph.n_senders, graph.n_receivers, dtype=torch.bool)
    every = graph.valid[None].expand(pairs.n_pairs, -1, -1)
    assert torch.allclose(circuit_metric(model, cache, source, pair_i, none, Cost()), cache.base_metric, atol=1e-12)
    with torch.no_grad():
        final = model.run_layers(model.embed(pairs.noise), Run(model.n_layers))
        want = pairs.evaluate_metric(model.unembed(final[:, -1]), pair_i)
    got = circuit_metric(model, cache, source, pair_i, every, Cost())
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10), family
    one = torch.zeros_like(none)
    e = int(refs[None]["exact"].abs().sum(0).argmax())  # the largest edge: one absent edge = exact patching
    one[:, graph.sender_index[e], graph.receiver_index[e]] = True
    got = circuit_metric(model, cache, source, pair_i, one, Cost()) - cache.base_metric
    assert_rel_close(got, refs[None]["exact"][:, e], 1e-10, f"{family} {graph.edge_names[e]}")
