"""result: Attribution ranking, tables and save/load, on hand-made tensors."""

from __future__ import annotations

import pytest
import torch

import atpstar
from atpstar.cost import Cost
from atpstar.result import aggregate


def make_result() -> atpstar.Attribution:
    per_pair = {
        "neuron": torch.tensor([[[[0.1, -5.0], [0.0, 0.2]]], [[[0.3, -3.0], [0.0, 0.2]]]], dtype=torch.float64),  # [2, 1, 2, 2]
        "key": torch.tensor([[[[1.0, -0.5]]], [[[3.0, 0.5]]]], dtype=torch.float64),  # [2, 1, 1, 2]
    }
    return atpstar.Attribution(
        method="atp", options={"batch_size": None}, direction="noising", metric="logit_diff", model_id="toy",
        per_pair=per_pair, scores=aggregate(per_pair, "mean_abs"), aggregation="mean_abs", cost=Cost(4.0, 2.0),
        info={"n_pairs": 2},
    )


def test_aggregations():
    values = {"head": torch.tensor([[1.0, -2.0], [-3.0, 2.0]])}
    assert torch.equal(aggregate(values, "mean")["head"], torch.tensor([-1.0, 0.0]))
    assert torch.equal(aggregate(values, "mean_abs")["head"], torch.tensor([2.0, 2.0]))
    with pytest.raises(atpstar.InputError):
        aggregate(values, "median")


def test_top_orders_by_absolute_score_across_types():
    result = make_result()
    top = result.top(5)
    assert [n.name for n in top] == [
        "blocks.0.mlp.hook_post[pos 0, 1]",  # mean |.| of -5, -3 = 4
        "blocks.0.attn.hook_k[pos 0, head 0]",  # 2
        "blocks.0.attn.hook_k[pos 1, head 0]",  # 0.5
        "blocks.0.mlp.hook_post[pos 0, 0]",  # 0.2, tied with the next: layout order wins (stable)
        "blocks.0.mlp.hook_post[pos 1, 1]",  # 0.2
    ]
    assert top[0].score == pytest.approx(4.0) and top[0].node_type == "neuron" and top[0].index == (0, 0, 1)
    assert [n.name for n in result.top(2, node_types=["key"])] == [
        "blocks.0.attn.hook_k[pos 0, head 0]", "blocks.0.attn.hook_k[pos 1, head 0]"]
    scores = [abs(n.score) for n in result.top(100)]
    assert scores == sorted(scores, reverse=True) and len(scores) == 6


def test_to_rows_and_csv(tmp_path):
    result = make_result()
    rows = result.to_rows()
    assert len(rows) == 6 and [r["rank"] for r in rows] == list(range(1, 7))
    assert rows[0] == {"rank": 1, "name": "blocks.0.mlp.hook_post[pos 0, 1]", "node_type": "neuron", "layer": 0,
                       "pos": 0, "index": 1, "score": pytest.approx(4.0)}
    assert rows[1]["head"] == 0 and rows[1]["pos"] == 0 and rows[1]["layer"] == 0
    assert len(result.to_rows(2)) == 2
    result.to_csv(tmp_path / "t.csv", k=3)
    lines = (tmp_path / "t.csv").read_text().strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("rank,name")


def test_save_load(tmp_path):
    result = make_result()
    result.save(tmp_path / "r.safetensors")
    loaded = atpstar.Attribution.load(tmp_path / "r")
    assert loaded.method == "atp" and loaded.options == {"batch_size": None} and loaded.info == {"n_pairs": 2}
    assert loaded.cost.forward == 4.0 and loaded.cost.backward == 2.0 and loaded.cost.forward_equivalents == 8.0
    for t in ("neuron", "key"):
        assert torch.equal(loaded.per_pair[t], result.per_pair[t]) and loaded.per_pair[t].dtype == torch.float64
    assert loaded.n_pairs == 2
    with pytest.raises(atpstar.InputError, match="no saved attribution"):
        atpstar.Attribution.load(tmp_path / "missing")
