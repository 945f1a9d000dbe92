"""Sparse products with Δf equal the dense formulas (float64), on sparse and dense differences."""

from __future__ import annotations

import pytest
import torch

from atpstar.dictionaries.sparse import delta_times_pullback, delta_times_rows


@pytest.mark.parametrize("share", [0.02, 0.1, 0.6])
def test_sparse_products_match_dense(share):
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(3, 5, 64, generator=gen, dtype=torch.float64)
    delta = delta * (torch.rand(3, 5, 64, generator=gen, dtype=torch.float64) < share)
    rows = torch.randn(64, 7, generator=gen, dtype=torch.float64)
    grad = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(delta_times_rows(delta, rows), delta @ rows, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(delta_times_pullback(delta, grad, rows), delta * (grad @ rows.T), rtol=1e-12, atol=1e-12)


def test_all_zero_and_empty():
    rows = torch.randn(4, 3, dtype=torch.float64)
    zero = torch.zeros(2, 4, dtype=torch.float64)
    assert torch.equal(delta_times_rows(zero, rows), torch.zeros(2, 3, dtype=torch.float64))
    assert torch.equal(delta_times_pullback(zero, torch.ones(2, 3, dtype=torch.float64), rows), zero)
    assert delta_times_rows(torch.zeros(0, 4, dtype=torch.float64), rows).shape == (0, 3)


@pytest.mark.parametrize("method", ["atp", "atp*"])
def test_latent_estimates_same_with_sparse_and_dense_products(method, tmp_path, monkeypatch):
    import atpstar
    from atpstar.dictionaries import detach, sparse
    from atpstar.testing.fixtures import write_circuit_tracer, write_saelens
    from reference.models import build_hf, load, make_pairs

    model, pairs = load(build_hf("llama", n_layers=3)), make_pairs(n_pairs=2, seq_len=5)
    found = [
        atpstar.load_dictionary(write_saelens(tmp_path / "a", "blocks.0.hook_resid_post", 32, 40, seed=1,
                                              activation="topk", k=2), name="sp-topk"),
        atpstar.load_dictionary(write_saelens(tmp_path / "b", "blocks.1.hook_attn_out", 32, 40, seed=2), name="sp-relu"),
        atpstar.load_dictionary(write_circuit_tracer(tmp_path / "c", [1], 32, 40, seed=3), layer=1, name="sp-tc"),
    ]  # fmt: skip
    try:
        results = []
        for share in (2.0, -1.0):  # every product sparse, then every product dense
            monkeypatch.setattr(sparse, "DENSE_SHARE", share)
            results.append(atpstar.attribute(model, pairs, method, nodes=[], dictionaries=found))
        for node_type, value in results[0].per_pair.items():
            torch.testing.assert_close(value, results[1].per_pair[node_type], rtol=1e-10, atol=1e-12)
    finally:
        detach(d.name for d in found)
