"""Position-resolved edges (``edge_positions=True``): every edge method against brute-force path patching
with the sender's difference at one position only (``reference.edges``, ``position=t``), float64, on tiny
random GPT-2, GPT-NeoX (parallel residual) and Llama-GQA models; and how they sum over positions."""

from __future__ import annotations

import pytest
import torch

import atpstar
from atpstar.edges.graph import graph_of
from reference.edges import edge_references, qk_fix_references
from reference.models import assert_rel_close, build_hf, load, make_pairs

FAMILIES = ("gpt2", "gpt_neox", "llama")
SEQ_LEN = 5
IG_STEPS = 2


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    hf = build_hf(request.param, n_layers=2, seed=3)
    model = load(hf)
    pairs = make_pairs(n_pairs=1, seq_len=SEQ_LEN, seed=4)  # one pair: T references per estimator
    graph = graph_of(model)
    names = (graph.edge_names, graph.sender_names)

    def per_position(drop):
        """{"exact", "eap"} [P, N, T]: the reference with the sender's difference at each position t alone."""
        values = [edge_references(hf, pairs, *names, drop_layer=drop, position=t) for t in range(SEQ_LEN)]
        return {key: torch.stack([v[key] for v in values], -1) for key in ("exact", "eap")}

    refs = {drop: per_position(drop) for drop in (None, *range(model.n_layers))}

    def qk_fixed(drop):
        values = refs[drop]["eap"].clone()  # [P, N, T]
        for t in range(SEQ_LEN):
            for i, v in qk_fix_references(hf, model, pairs, *names, drop, position=t).items():
                values[:, i, t] = v
        return values

    return hf, model, pairs, graph, refs, qk_fixed


def run(model, pairs, method, positions=True, **options):
    result = atpstar.attribute(model, pairs, method=method, nodes=["edge"], edge_positions=positions, **options)
    n = len(atpstar.edge_names(model))
    assert result.per_pair["edge"].shape == ((pairs.n_pairs, n, SEQ_LEN) if positions else (pairs.n_pairs, n))
    return result.per_pair["edge"]


def test_exact_edge_patching_per_position(setup):
    _, model, pairs, _, refs, _ = setup
    assert_rel_close(run(model, pairs, "activation_patching", batch_size=11), refs[None]["exact"], 1e-10, "exact")


def test_eap_per_position(setup):
    _, model, pairs, _, refs, _ = setup
    per_pos = run(model, pairs, "atp")
    assert_rel_close(per_pos, refs[None]["eap"], 1e-10, "EAP")
    assert_rel_close(per_pos.sum(-1), run(model, pairs, "atp", positions=False), 1e-12, "EAP summed over positions")


def test_eap_ig_per_position(setup):
    hf, model, pairs, graph, _, _ = setup
    want = torch.stack(
        [
            edge_references(hf, pairs, graph.edge_names, graph.sender_names, ig_steps=IG_STEPS, position=t)["eap"]
            for t in range(SEQ_LEN)
        ],
        -1,
    )
    per_pos = run(model, pairs, "atp+ig", ig_steps=IG_STEPS)
    assert_rel_close(per_pos, want, 1e-10, "EAP-IG")
    summed = run(model, pairs, "atp+ig", positions=False, ig_steps=IG_STEPS)
    assert_rel_close(per_pos.sum(-1), summed, 1e-12, "EAP-IG summed over positions")


def test_graddrop_per_position(setup):
    _, model, pairs, _, refs, _ = setup
    want = sum(refs[drop]["eap"].abs() for drop in range(model.n_layers)) / (model.n_layers - 1)
    assert_rel_close(run(model, pairs, "atp+graddrop"), want, 1e-10, "GradDrop")


def test_qk_fix_and_atp_star_per_position(setup):
    # The QK-fix reference reads A' from transformers' eager attention formula with a float64 softmax.
    _, model, pairs, _, _, qk_fixed = setup
    assert_rel_close(run(model, pairs, "atp+qkfix"), qk_fixed(None), 1e-10, "QK fix")
    want = sum(qk_fixed(drop).abs() for drop in range(model.n_layers)) / (model.n_layers - 1)
    assert_rel_close(run(model, pairs, "atp*"), want, 1e-10, "AtP*")


def test_qk_fix_sums_over_positions_except_at_keys(setup):
    # A query change at t moves row t of the pattern only: the fix splits exactly into positions.
    # A key change moves every row: one key at a time is a different quantity from all keys at once.
    _, model, pairs, graph, _, _ = setup
    per_pos, summed = run(model, pairs, "atp+qkfix"), run(model, pairs, "atp+qkfix", positions=False)
    key = torch.tensor([n.endswith("<k>") for n in graph.edge_names])
    assert_rel_close(per_pos[:, ~key].sum(-1), summed[:, ~key], 1e-12, "QK fix summed (not keys)")
    assert not torch.allclose(per_pos[:, key].sum(-1), summed[:, key], rtol=1e-6, atol=1e-9)


def test_names_tables_verify_and_evaluate_carry_positions(setup):
    _, model, pairs, graph, refs, _ = setup
    est = atpstar.attribute(model, pairs, method="atp", nodes=["edge"], edge_positions=True)
    top = est.top(3)
    n, t = top[0].index
    assert top[0].name == f"{graph.edge_names[n]}[pos {t}]"
    assert {"index", "pos"} <= set(est.to_rows(k=2)[0])
    checked = atpstar.verify(model, pairs, est, budget=4)
    assert checked.names[0] == top[0].name
    want = torch.stack([refs[None]["exact"][:, e, p] for e, p in (node.index for node in top[:1])], 0)
    assert_rel_close(checked.effects[:1], want, 1e-10, "verified per-position edge")
    truth = atpstar.attribute(model, pairs, method="activation_patching", nodes=["edge"], edge_positions=True)
    ev = atpstar.evaluate(truth, [est])
    assert ev.n_nodes == graph.n_edges * SEQ_LEN


def test_position_resolved_edges_are_not_exported_to_mib(setup, tmp_path):
    _, model, pairs, _, _, _ = setup
    est = atpstar.attribute(model, pairs, method="atp", nodes=["edge"], edge_positions=True)
    with pytest.raises(atpstar.InputError, match="position"):
        est.to_mib(tmp_path / "circuit.json")
    with pytest.raises(atpstar.InputError, match="position-summed"):
        atpstar.faithfulness_curve(model, pairs, est)
    with pytest.raises(atpstar.InputError, match="edge_positions"):
        atpstar.attribute(model, pairs, method="atp", nodes=["head"], edge_positions=True)
