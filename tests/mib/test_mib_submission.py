"""``atpstar.mib``: the submission folder MIB expects, and MIB's evaluation of it, checked by the
re-implementation of MIB's code in ``mib_reference``."""

from __future__ import annotations

import json

import pytest
from mib_reference import area_under_curve, load_circuit, multifile_curve

from atpstar.cli import main
from atpstar.edges.circuits import SIGN
from atpstar.errors import InputError
from atpstar.mib import CIRCUIT_FRACTIONS, folder_name, method_folder, run_mib
from atpstar.result import Attribution
from reference.models import build_hf, load, make_pairs
from test_cli import make_tiny, write_pairs


@pytest.fixture(scope="module")
def gpt2():
    hf_model = build_hf("gpt2", n_layers=2, seed=31)
    return hf_model, load(hf_model), make_pairs(n_pairs=3, seq_len=6, seed=32)


def data_of(pairs):
    return pairs.clean, pairs.noise, pairs.answer, pairs.distractor


def test_names():
    assert folder_name("arc_easy", "gemma2") == "arc-easy_gemma2"
    assert folder_name("arithmetic_subtraction", "llama3") == "arithmetic-subtraction_llama3"
    assert method_folder("atp*") == "atp_star_patching_edge"
    with pytest.raises(InputError, match="does not score"):
        run_mib(None, None, "x", task="mcqa", model_name="gpt2")


def test_score_file_submission_is_scored_as_mib_scores_it(gpt2, tmp_path):
    hf_model, model, pairs = gpt2
    made = run_mib(model, pairs, tmp_path, task="ioi", method="atp")
    assert made.folder == tmp_path / "submission" / "atp_patching_edge" / "ioi_gpt2"
    assert [p.name for p in made.folder.iterdir()] == ["importances.json"]
    path = str(made.folder / "importances.json")
    signed = area_under_curve(hf_model, load_circuit(path), data_of(pairs), absolute=False)
    absolute = area_under_curve(hf_model, load_circuit(path), data_of(pairs), absolute=True)
    assert made.scores.cpr == pytest.approx(signed["area_under"], rel=1e-7)
    assert made.scores.cmd == pytest.approx(absolute["area_from_1"], rel=1e-7)
    saved = json.loads((tmp_path / "results" / "atp_patching_edge" / "ioi_gpt2_validation_abs-False.json").read_text())
    assert saved["faithfulnesses"] == pytest.approx(signed["faithfulnesses"], rel=1e-7, abs=1e-9)
    again = run_mib(model, pairs, tmp_path, task="ioi", method="atp")  # reused: same numbers, nothing rerun
    assert (again.scores.cpr, again.scores.cmd) == (made.scores.cpr, made.scores.cmd)


def test_nine_circuit_submission_is_scored_as_mib_scores_it(gpt2, tmp_path):
    hf_model, model, pairs = gpt2
    made = run_mib(model, pairs, tmp_path, task="ioi", method="atp*", form="circuits")
    root = tmp_path / "submission" / "atp_star_patching_edge"
    for absolute in (False, True):
        folder = root / f"abs-{absolute}" / "ioi_gpt2"
        files = sorted(p.name for p in folder.iterdir())
        assert len(files) == len(CIRCUIT_FRACTIONS) == 9
        n_edges = len(load_circuit(str(folder / files[0])).edges)
        for fraction in CIRCUIT_FRACTIONS:
            circuit = load_circuit(str(folder / f"circuit_{fraction:g}.json"))
            assert int(circuit.in_graph.sum()) <= int(fraction * n_edges)
        ref = multifile_curve(hf_model, str(folder), data_of(pairs))
        if absolute:
            assert made.scores.cmd == pytest.approx(ref["area_from_1"], rel=1e-7)
        else:
            assert made.scores.cpr == pytest.approx(ref["area_under"], rel=1e-7)


def test_mib_command_writes_the_submission_and_the_numbers(tmp_path, capsys):
    model, pairs = make_tiny(tmp_path / "model"), write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "out"
    args = ["mib", "--model", str(model), "--task", str(pairs), "--mib-task", "ioi", "--mib-model", "gpt2"]
    args += ["--method", "atp", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert (out / "submission" / "atp_patching_edge" / "ioi_gpt2" / "importances.json").is_file()
    for name in ("atp.mib.json", "atp.faithfulness.json", "mib_table.md", "mib.png", "atp.edges.json"):
        assert (out / name).is_file(), name
    assert (out / "results" / "atp_patching_edge" / "ioi_gpt2_validation_abs-True.json").is_file()
    assert "| atp |" in capsys.readouterr().out
    assert main([*args[:-1], "--direction", "denoising", "--no-progress"]) == 2


def test_a_graddrop_result_saved_without_its_sign_is_made_again(gpt2, tmp_path):
    _, model, pairs = gpt2
    made = run_mib(model, pairs, tmp_path, task="ioi", method="atp*")
    base = tmp_path / "atp_star.edges"
    old = Attribution.load(base)
    old.extras = {}  # as atpstar 0.3 saved it
    old.save(base)
    again = run_mib(model, pairs, tmp_path, task="ioi", method="atp*")
    assert SIGN in again.result.extras and SIGN in Attribution.load(base).extras
    assert again.scores.cpr == pytest.approx(made.scores.cpr, rel=1e-12)
