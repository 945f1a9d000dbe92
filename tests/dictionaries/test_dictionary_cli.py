"""``--dictionary PATH`` on the command line: run (with plots and report), verify, find."""

from __future__ import annotations

import json

import pytest

from atpstar.cli import main
from atpstar.dictionaries import detach
from atpstar.testing.fixtures import write_circuit_tracer, write_saelens
from test_cli import make_tiny, write_pairs


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    sae = write_saelens(root / "sae-cli", "blocks.0.hook_resid_post", 32, 8, seed=1)
    transcoder = write_circuit_tracer(root / "tc", [1], 32, 8, seed=2)
    yield make_tiny(root / "model"), write_pairs(root / "pairs.jsonl"), sae, transcoder
    detach(["sae-cli", "tc-layer1"])


def test_run_verify_and_find_take_dictionaries(setting, tmp_path, capsys):
    model, pairs, sae, transcoder = setting
    common = ["--model", str(model), "--task", str(pairs), "--no-progress", "--dictionary", str(sae),
              "--dictionary", str(transcoder)]  # fmt: skip
    assert main(["run", *common, "--method", "atp*", "--nodes", "head", "--out", str(tmp_path / "run")]) == 0
    header = (tmp_path / "run" / "top_nodes.csv").read_text().splitlines()[0]
    assert "dictionary" in header.split(",")
    report = (tmp_path / "run" / "report.html").read_text()
    assert "sae-cli" in report and (tmp_path / "run" / "heatmaps.png").exists()
    meta = json.loads((tmp_path / "run" / "estimate.json").read_text())
    assert {"sae-cli", "sae-cli.error", "tc-layer1", "tc-layer1.error"} <= set(meta["node_types"])
    capsys.readouterr()
    assert main(["verify", *common, "--no-plots", "--estimate", str(tmp_path / "run" / "estimate"), "--budget", "4",
                 "--out", str(tmp_path / "ver")]) == 0  # fmt: skip
    assert "exact effect" in capsys.readouterr().out
    assert main(["find", *common, "--no-plots", "--nodes", "sae-cli,sae-cli.error", "--theta", "0.5",
                 "--out", str(tmp_path / "find")]) == 0  # fmt: skip


def test_a_dictionary_of_another_width_exits_2(setting, tmp_path, capsys):
    model, pairs, _, _ = setting
    wide = write_saelens(tmp_path / "wide", "blocks.0.hook_resid_post", 48, 8)
    code = main(["run", "--model", str(model), "--task", str(pairs), "--no-progress", "--no-plots", "--nodes", "head",
                 "--dictionary", str(wide), "--out", str(tmp_path / "o")])  # fmt: skip
    assert code == 2 and "d_in 48" in capsys.readouterr().err
    detach(["wide"])


def test_compare_reuses_latent_results_of_the_same_dictionary_only(setting, tmp_path, capsys):
    model, pairs, sae, _ = setting
    out = tmp_path / "cmp"
    args = ["compare", "--model", str(model), "--task", str(pairs), "--methods", "atp,atp*", "--nodes", "head",
            "--no-progress", "--no-plots", "--k-max", "5", "--out", str(out)]  # fmt: skip
    assert main([*args, "--dictionary", str(sae)]) == 0
    assert (out / "ground_truth.json").is_file()
    capsys.readouterr()
    assert main([*args, "--dictionary", str(sae)]) == 0
    assert "reusing" in capsys.readouterr().err
    other = write_saelens(tmp_path / "sae-cli", "blocks.0.hook_resid_post", 32, 8, seed=9)  # same name, new weights
    assert main([*args, "--dictionary", str(other)]) == 2
    assert "dictionaries" in capsys.readouterr().err
