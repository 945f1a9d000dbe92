"""``atpstar find`` on the tiny GPT-NeoX of the CLI tests: certificate printed and written, bad input exit 2."""

from __future__ import annotations

import json

import pytest
from test_cli import make_tiny, write_pairs

from atpstar.cli import main
from atpstar.localization import Localization


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
