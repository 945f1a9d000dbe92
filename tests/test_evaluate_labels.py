"""Estimates of one method with different options keep a row each in ``evaluate``, labelled by those options."""

from __future__ import annotations

import pytest

import atpstar
from atpstar.errors import InputError
from atpstar.evaluate import evaluate
from reference.models import build_hf, load, make_pairs


@pytest.fixture(scope="module")
def setting():
    model = load(build_hf("gpt2", n_layers=2, seed=0))
    pairs = make_pairs(n_pairs=2, seq_len=5)
    return model, pairs


@pytest.mark.parametrize(
    "nodes,method,option",
    [(["head"], "subsampling", "samples"), (["edge"], "atp+ig", "ig_steps")],
    ids=["head", "edge"],
)
def test_one_method_with_two_settings_keeps_both_rows(setting, nodes, method, option, tmp_path) -> None:
    model, pairs = setting
    truth = atpstar.attribute(model, pairs, method="activation_patching", nodes=nodes)
    few = atpstar.attribute(model, pairs, method=method, nodes=nodes, **{option: 4})
    many = atpstar.attribute(model, pairs, method=method, nodes=nodes, **{option: 16})
    atp = atpstar.attribute(model, pairs, method="atp", nodes=nodes)
    ev = evaluate(truth, [few, atp, many])
    low, high = f"{method}({option}=4)", f"{method}({option}=16)"
    assert sorted(ev.curves) == sorted(["atp", low, high])
    assert ev.curves[low].own_cost < ev.curves[high].own_cost
    assert {row["method"] for row in ev.to_rows()} == set(ev.curves)
    ev.to_csv(tmp_path / "table.csv")
    table = (tmp_path / "table.csv").read_text()
    assert low in table and high in table
    assert low in ev.to_markdown() and high in ev.to_markdown()


def test_atp_star_keep_all_and_keep_top_keep_both_rows(setting) -> None:
    model, pairs = setting
    truth = atpstar.attribute(model, pairs, method="activation_patching", nodes=["head"])
    everything = atpstar.attribute(model, pairs, method="atp*", nodes=["head"], keep="all")
    top = atpstar.attribute(model, pairs, method="atp*", nodes=["head"], keep="top", top_k=4)
    ev = evaluate(truth, [everything, top])
    assert sorted(ev.curves) == ["atp*(keep=all, top_k=100)", "atp*(keep=top, top_k=4)"]


def test_the_plot_legend_uses_the_labels(setting, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from atpstar.plots import plot_cost_curves

    model, pairs = setting
    truth = atpstar.attribute(model, pairs, method="activation_patching", nodes=["head"])
    ev = evaluate(truth, [atpstar.attribute(model, pairs, method="subsampling", nodes=["head"], samples=n)
                          for n in (8, 16)])
    svg = plot_cost_curves(ev, tmp_path / "curves")[1].read_text()
    assert "subsampling(samples=8)" in svg and "subsampling(samples=16)" in svg


def test_the_same_estimate_twice_is_refused(setting) -> None:
    model, pairs = setting
    truth = atpstar.attribute(model, pairs, method="activation_patching", nodes=["head"])
    atp = atpstar.attribute(model, pairs, method="atp", nodes=["head"])
    again = atpstar.attribute(model, pairs, method="atp", nodes=["head"], memory_gb=0.5)  # same numbers
    with pytest.raises(InputError, match=r"estimates 0 and 1 are both 'atp' with the same options"):
        evaluate(truth, [atp, again])
