"""keep="top" / keep="disk": per-pair top-k and safetensors shards equal the dense run; scores are exact."""

from __future__ import annotations

import pytest
import torch

import atpstar
from atpstar.errors import InputError
from atpstar.sink import read_per_pair
from reference.models import build_hf, load, make_pairs

NODES = ["neuron", "query", "key"]


@pytest.fixture(scope="module")
def setup():
    model = load(build_hf("gpt_neox", n_layers=2, seed=21))
    pairs = make_pairs(n_pairs=5, seq_len=4, seed=22)
    dense = atpstar.attribute(model, pairs, method="atp*", nodes=NODES, batch_size=2)
    return model, pairs, dense


def dense_top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: zero all but the k largest |value| of each pair."""
    flat = values.flatten(1)
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter(1, flat.abs().topk(k, dim=1).indices, True)
    return torch.where(keep, flat, torch.zeros_like(flat)).view_as(values)


def test_top_keeps_each_pairs_top_k_and_exact_scores(setup, tmp_path):
    model, pairs, dense = setup
    top = atpstar.attribute(model, pairs, method="atp*", nodes=NODES, batch_size=2, keep="top", top_k=7)
    for t in NODES:
        assert top.per_pair[t].is_sparse and top.per_pair[t].shape == dense.per_pair[t].shape
        assert top.per_pair[t]._nnz() == 5 * 7
        torch.testing.assert_close(top.per_pair[t].to_dense(), dense_top(dense.per_pair[t], 7))
        torch.testing.assert_close(top.scores[t], dense.scores[t], rtol=1e-12, atol=1e-14)
    assert top.info["keep"] == "top"
    assert [n.name for n in top.top(10)] == [n.name for n in dense.top(10)]
    top.save(tmp_path / "top")
    back = atpstar.Attribution.load(tmp_path / "top")
    for t in NODES:
        torch.testing.assert_close(back.per_pair[t].to_dense(), top.per_pair[t].to_dense())


def test_disk_streams_every_pair(setup, tmp_path):
    model, pairs, dense = setup
    folder = tmp_path / "shards"
    got = atpstar.attribute(
        model, pairs, method="atp", nodes=NODES, batch_size=2, keep="disk", top_k=3, out_dir=str(folder)
    )
    want = atpstar.attribute(model, pairs, method="atp", nodes=NODES, batch_size=2)
    assert len(got.info["per_pair_shards"]) == 3  # pairs 0-1, 2-3, 4
    for t in NODES:
        torch.testing.assert_close(read_per_pair(folder, t), want.per_pair[t], rtol=0, atol=0)
        torch.testing.assert_close(read_per_pair(folder, t, pairs=[4, 1]), want.per_pair[t][[4, 1]], rtol=0, atol=0)
        torch.testing.assert_close(got.scores[t], want.scores[t], rtol=1e-12, atol=1e-14)
    (folder / got.info["per_pair_shards"][1]).unlink()
    with pytest.raises(InputError, match="is missing"):
        read_per_pair(folder, "neuron")
    with pytest.raises(InputError, match="already holds per-pair shards"):
        atpstar.attribute(model, pairs, method="atp", nodes=NODES, keep="disk", out_dir=str(folder))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"keep": "some"}, "unknown keep"),
        ({"keep": "top", "top_k": 0}, "top_k must be"),
        ({"keep": "disk"}, "pass out_dir"),
    ],
)
def test_bad_keep_options(setup, options, match):
    model, pairs, _ = setup
    with pytest.raises(InputError, match=match):
        atpstar.attribute(model, pairs, method="atp", nodes=NODES, **options)


def test_top_results_evaluate_per_pair(setup):
    model, pairs, dense = setup
    truth = atpstar.attribute(model, pairs, method="activation_patching", nodes=NODES)
    top = atpstar.attribute(model, pairs, method="atp*", nodes=NODES, batch_size=2, keep="top", top_k=7)
    evaluation = atpstar.evaluate(truth, {"atp* top-7": top}, setting="per_pair")
    assert evaluation is not None
