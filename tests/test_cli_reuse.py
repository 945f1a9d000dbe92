"""The command line refuses reused results and degenerate pairs with one ``error:`` line and exit status 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from atpstar.cli import main
from test_cli import make_tiny, write_pairs


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reuse")
    model = make_tiny(root / "model")
    other = root / "other"  # same tokenizer and config, other weights
    shutil.copytree(model, other)
    weights = load_file(str(other / "model.safetensors"))
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()},
              str(other / "model.safetensors"), metadata={"format": "pt"})
    pairs = write_pairs(root / "pairs.jsonl")
    common = ["--model", str(model), "--task", str(pairs), "--no-progress", "--no-plots"]
    assert main(["run", *common, "--method", "atp", "--nodes", "edge", "--verify", "3", "--out", str(root / "e")]) == 0
    same = json.loads(pairs.read_text().splitlines()[1])
    write_pairs(root / "same_answer.jsonl", [pairs.read_text().splitlines()[0], json.dumps({**same, "distractor": same["answer"]})])
    return {"root": root, "model": model, "other": other, "pairs": pairs}


CASES = [
    ("edge estimate of another model", "verify --model {other} --task {pairs} --estimate {root}/e/estimate",
     "model weights (saved"),
    ("edge verification of another model", "bound --model {other} --task {pairs} --verified {root}/e/verified "
     "--theta 1", "model weights (saved"),
    ("answer equals distractor", "run --model {model} --task {root}/same_answer.jsonl", "same_answer.jsonl:2"),
]


@pytest.mark.parametrize("case,command,expected", CASES, ids=[case for case, _, _ in CASES])
def test_refused_with_one_clean_error(setup, tmp_path, capsys, case, command, expected) -> None:
    argv = command.format(**{k: str(v) for k, v in setup.items()}).split()
    code = main([*argv, "--out", str(tmp_path / "out"), "--no-progress", "--no-plots"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("error: ") == 1 and expected in err, err
