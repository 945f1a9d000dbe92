"""Plots write PNG and SVG files from small synthetic results."""

from __future__ import annotations

import pytest
import torch

from atpstar import Attribution, Cost
from atpstar.evaluate import evaluate
from atpstar.plots import contribution_maps, plot_cost_curves, plot_estimate_vs_truth, plot_heatmaps, plot_verified

pytest.importorskip("matplotlib", reason="plots need the optional matplotlib dependency")


def _result(method: str, seed: int, aggregation: str = "mean_abs") -> Attribution:
    gen = torch.Generator().manual_seed(seed)
    per_pair = {"neuron": torch.randn(3, 2, 5, 8, generator=gen), "query": torch.randn(3, 2, 4, 5, generator=gen),
                "key": torch.randn(3, 2, 2, 5, generator=gen)}
    per_pair["key"][:, :, :, 0] = 0.0  # exact zeros must not break the log axes
    scores = {t: v.mean(0) if aggregation == "mean" else v.abs().mean(0) for t, v in per_pair.items()}
    return Attribution(method, {}, "noising", "logit_diff", "tiny", per_pair, scores, aggregation, Cost(2, 1))


def test_all_plots_written(tmp_path) -> None:
    truth = _result("activation_patching", 0, "mean")
    atp, star = _result("atp", 1), _result("atp*", 2)
    for setting in ("per_pair", "distribution"):
        ev = evaluate(truth, [atp, star], setting=setting)
        paths = plot_cost_curves(ev, tmp_path / f"curves_{setting}")
        assert [p.suffix for p in paths] == [".png", ".svg"] and all(p.stat().st_size > 1000 for p in paths)
    paths = plot_estimate_vs_truth(truth, [atp, star], tmp_path / "sub" / "scatter")
    assert all(p.is_file() for p in paths)
    paths = plot_heatmaps(star, tmp_path / "heat", tokens=["a", "b", "c", "d", "e"])
    assert paths[1].read_text().lstrip().startswith("<?xml")
    nodes = [("query", (0, 1, 2)), ("neuron", (1, 4, 7))]
    assert all(p.is_file() for p in plot_verified(nodes, torch.randn(2, 3), star, tmp_path / "verified"))


def test_contribution_maps_sum_over_the_right_axes() -> None:
    result = _result("atp", 3)
    maps = contribution_maps(result, "query")
    assert maps["layer x head"].shape == (2, 4) and maps["layer x pos"].shape == (2, 5)
    assert maps["layer x head"].sum() == pytest.approx(float(result.scores["query"].abs().sum()))
    assert set(contribution_maps(result, "neuron")) == {"layer x pos"}
