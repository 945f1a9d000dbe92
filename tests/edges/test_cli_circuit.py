"""``atpstar circuit`` end to end on the tiny CLI model."""

from __future__ import annotations

import json

import pytest
import torch

from atpstar import Attribution
from atpstar.cli import main
from atpstar.edges.circuits import FaithfulnessCurve, areas
from atpstar.edges.mib import load_mib
from test_cli import make_tiny, write_pairs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_circuit")
    return make_tiny(root / "model"), write_pairs(root / "pairs.jsonl")


def test_circuit_writes_mib_files_curves_and_report(tiny, tmp_path, capsys):
    model, pairs = tiny
    out = tmp_path / "circuit"
    code = main(
        [
            "circuit",
            "--model",
            str(model),
            "--task",
            str(pairs),
            "--method",
            "atp,atp+ig",
            "--option",
            "atp+ig:ig_steps=2",
            "--fractions",
            "0.05,0.2,1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    for name in (
        "atp.mib.json",
        "atp_ig.mib.json",
        "atp.faithfulness.json",
        "atp.circuits.json",
        "report.html",
        "faithfulness.png",
        "circuit_table.md",
    ):
        assert (out / name).is_file(), name
    curve = FaithfulnessCurve.load(out / "atp_ig.faithfulness.json")
    assert curve.fractions == [0.05, 0.2, 1.0] and curve.method == "atp+ig"
    assert curve.cpr == pytest.approx(areas(curve.fractions, curve.faithfulness)[0])
    assert curve.cmd == pytest.approx(areas(curve.fractions, curve.faithfulness_abs)[1])
    circuit = load_mib(out / "atp.mib.json")
    assert bool(circuit.in_graph.all()) and torch.isfinite(circuit.scores).all()
    sizes = json.loads((out / "atp.circuits.json").read_text())
    assert len(sizes["1"]) == circuit.graph.n_edges
    assert "| atp+ig |" in capsys.readouterr().out


def test_circuit_refuses_a_method_without_edges(tiny, tmp_path, capsys):
    model, pairs = tiny
    assert (
        main(
            ["circuit", "--model", str(model), "--task", str(pairs), "--method", "subsampling", "--out", str(tmp_path)]
        )
        == 2
    )
    assert "no edge form" in capsys.readouterr().err


def test_compare_ranks_edge_estimators(tiny, tmp_path, capsys):
    model, pairs = tiny
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--model",
        str(model),
        "--task",
        str(pairs),
        "--methods",
        "atp,atp*",
        "--nodes",
        "edge",
        "--out",
        str(out),
        "--no-progress",
        "--k-max",
        "5",
        "--setting",
        "distribution",
    ]
    assert main(args) == 0
    table = (out / "comparison_distribution.md").read_text()
    assert "| atp |" in table and "| atp* |" in table
    saved = json.loads((out / "evaluation_distribution.json").read_text())
    truth = Attribution.load(out / "ground_truth")
    assert truth.method == "activation_patching" and truth.node_types == ["edge"]
    assert saved["node_types"] == ["edge"] and saved["n_nodes"] == truth.scores["edge"].numel()
    assert "cost@1" in capsys.readouterr().out
