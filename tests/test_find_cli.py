"""``atpstar find`` on the tiny GPT-NeoX of the CLI tests: certificate printed and written, bad input exit 2."""

from __future__ import annotations

import json

import pytest
from test_cli import make_tiny, write_pairs

from atpstar.cli import main
from atpstar.find.localization import Localization


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tiny_find")
    return make_tiny(root / "model"), write_pairs(root / "pairs.jsonl")


def test_find_prints_components_next_to_the_certificate(tiny, tmp_path, capsys) -> None:
    model, pairs = tiny
    out = tmp_path / "find"
    code = main(
        [
            "find",
            "--model",
            str(model),
            "--task",
            str(pairs),
            "--theta",
            "0.01",
            "--nodes",
            "attention",
            "--out",
            str(out),
            "--no-progress",
            "--no-plots",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    for word in (
        "components with |c| >= 0.01",
        "certificate",
        "theta",
        "alpha",
        "assumption",
        "rounds",
        "cost",
        "certified",
    ):
        assert word in printed
    certificate = json.loads((out / "certificate.json").read_text())
    found = Localization.load(out / "localization")
    assert certificate["certified"] == found.certified and certificate["n_found"] == len(found.nodes)
    assert certificate["theta"] == 0.01 and certificate["alpha"] == 0.05
    assert (out / "found.csv").read_text().count("\n") == len(found.nodes) + 1
    assert (out / "history.csv").is_file()
    report = (out / "report.html").read_text()
    assert "certificate" in report and "assumption" in report


def test_find_bad_input_exit_2(tiny, tmp_path, capsys) -> None:
    model, pairs = tiny
    common = ["find", "--model", str(model), "--task", str(pairs), "--out", str(tmp_path), "--no-progress"]
    assert main([*common, "--theta", "-1"]) == 2
    assert "theta" in capsys.readouterr().err
    assert main([*common, "--theta", "0.1", "--estimator", "atp-star"]) == 2
    assert "unknown estimator" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["find", "--model", str(model), "--task", str(pairs)])  # --theta is required


def test_find_resumes_from_its_out_folder(tiny, tmp_path, capsys) -> None:
    model, pairs = tiny
    common = ["find", "--model", str(model), "--task", str(pairs), "--nodes", "attention", "--out", str(tmp_path)]
    common += ["--no-progress", "--no-plots"]
    assert main([*common, "--theta", "0.01"]) == 0
    first = Localization.load(tmp_path / "localization")
    assert (tmp_path / "find.ckpt.safetensors").is_file()
    capsys.readouterr()
    assert main([*common, "--theta", "0.01"]) == 0
    err = capsys.readouterr().err
    assert "resuming from" in err and "resumed" in err and "completed steps" in err
    again = Localization.load(tmp_path / "localization")
    assert again.nodes == first.nodes and again.cost == first.cost and again.history == first.history
    assert main([*common, "--theta", "0.02"]) == 2  # another computation's checkpoint: refused, naming theta
    err = capsys.readouterr().err
    assert "theta (saved '0.01', now '0.02')" in err and "--recompute" in err
    assert main([*common, "--theta", "0.02", "--recompute"]) == 0
    assert "--recompute: discarding" in capsys.readouterr().err
    assert Localization.load(tmp_path / "localization").theta == 0.02


def test_find_over_edges_from_the_command_line(tiny, tmp_path, capsys) -> None:
    model, pairs = tiny
    code = main(
        ["find", "--model", str(model), "--task", str(pairs), "--theta", "0.01", "--nodes", "edge"]
        + ["--out", str(tmp_path), "--no-progress", "--no-plots"]
    )
    assert code == 0
    found = Localization.load(tmp_path / "localization")
    assert found.node_types == ["edge"] and found.certified
    printed = capsys.readouterr().out
    assert all(name in printed for name in found.names[:3]) and "-&gt;" in (tmp_path / "report.html").read_text()


def test_find_budget_below_the_estimate_is_refused_before_any_pass(tiny, tmp_path, capsys) -> None:
    model, pairs = tiny
    out = tmp_path / "find"
    common = ["find", "--model", str(model), "--task", str(pairs), "--out", str(out), "--no-progress", "--no-plots"]
    assert main([*common, "--theta", "0.01", "--nodes", "attention", "--budget", "5"]) == 2
    err = capsys.readouterr().err
    assert "\nerror: the atp* estimate alone costs" in err and "Traceback" not in err
    assert "budget=5" in err and "costs 10 forward equivalents" in err and "budget >= 10" in err
    assert not (out / "find.ckpt.safetensors").exists()  # refused before the first step


def test_find_patches_exhaustively_when_the_first_bound_cannot_pay(tiny, tmp_path) -> None:
    """On the tiny model the first bound would cost more than patching every attention node: after the estimate,
    find patches them all in one call (no more than the estimate over exhaustive patching)."""
    model, pairs = tiny
    out = tmp_path / "find"
    common = ["find", "--model", str(model), "--task", str(pairs), "--out", str(out), "--no-progress", "--no-plots"]
    assert main([*common, "--theta", "0.01", "--nodes", "attention"]) == 0
    found = Localization.load(out / "localization")
    assert found.certified and found.bound is not None and found.bound.n_unverified == 0
    estimate = found.cost["estimate"].forward_equivalents
    assert found.total_cost.forward_equivalents <= found.exhaustive_cost + estimate + 1e-9
    assert "exhaustive patching" in found.certificate()["fallback"]
