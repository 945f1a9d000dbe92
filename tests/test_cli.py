"""The command line on a tiny random GPT-NeoX saved to a folder, with a word-level tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from atpstar import Attribution
from atpstar.cli import build_parser, main, parse_options

WORDS = ["When", " Mary", " John", " Tom", " Anna", " and", " went", " to", " the", " store", " park", ",",
         " gave", " a", " drink", " book"]


def make_tiny(folder: Path) -> Path:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<unk>", "<bos>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[A-Za-z]+|[^\sA-Za-z]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>")
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=32, max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0,
                           bos_token_id=1, eos_token_id=1)
    GPTNeoXForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_pairs(path: Path, lines: list[str] | None = None) -> Path:
    lines = lines or [
        json.dumps({"clean": "When Mary and John went to the store, John gave a drink to",
                    "noise": "When Tom and Anna went to the store, Tom gave a drink to", "answer": " Mary", "distractor": " John"}),
        json.dumps({"clean": "When John and Mary went to the park, Mary gave a book to",
                    "noise": "When Anna and Tom went to the park, Tom gave a book to", "answer": " John", "distractor": " Mary"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny(root / "model"), write_pairs(root / "pairs.jsonl")


def test_run_writes_results_csv_plots_report(tiny, tmp_path, capsys) -> None:
    model, pairs = tiny
    out = tmp_path / "run"
    code = main(["run", "--model", str(model), "--task", str(pairs), "--method", "atp*", "--nodes", "all",
                 "--out", str(out), "--top", "5", "--no-progress"])
    assert code == 0
    for name in ("estimate.json", "estimate.safetensors", "top_nodes.csv", "heatmaps.png", "heatmaps.svg", "report.html"):
        assert (out / name).is_file(), name
    result = Attribution.load(out / "estimate")
    assert result.method == "atp*" and result.n_pairs == 2 and set(result.node_types) == {"neuron", "query", "key", "value", "head"}
    printed = capsys.readouterr().out
    assert "blocks." in printed and "atp* score" in printed
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and result.top(1)[0].name in html and "<link" not in html


def test_compare_reuses_ground_truth(tiny, tmp_path, capsys) -> None:
    model, pairs = tiny
    out = tmp_path / "cmp"
    args = ["compare", "--model", str(model), "--task", str(pairs), "--methods", "atp,atp*,subsampling,blocks,hierarchical",
            "--option", "subsampling:samples=16", "--option", "blocks:block_size=4", "--nodes", "qkv",
            "--out", str(out), "--no-progress", "--k-max", "5"]
    assert main(args) == 0
    for name in ("ground_truth.json", "ground_truth.safetensors", "comparison_per_pair.md", "comparison_distribution.csv",
                 "evaluation_per_pair.json", "cost_curves_per_pair.png", "estimate_vs_truth.svg", "report.html",
                 "estimates/atp_star.json"):
        assert (out / name).is_file(), name
    table = (out / "comparison_per_pair.md").read_text()
    assert all(f"| {m} |" in table for m in ("atp", "atp*", "subsampling", "blocks", "hierarchical"))
    printed = capsys.readouterr()
    assert "cost@1" in printed.out
    assert main(args + ["--no-plots"]) == 0
    assert "reusing" in capsys.readouterr().err


def test_bad_jsonl_line_exit_code(tiny, tmp_path, capsys) -> None:
    model, _ = tiny
    bad = write_pairs(tmp_path / "bad.jsonl", [
        json.dumps({"clean": "When Mary and John", "noise": "When Tom and Anna", "answer": " Mary"}),
        "{not json",
    ])
    code = main(["run", "--model", str(model), "--task", str(bad), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl:2" in err and "invalid JSON" in err and "Traceback" not in err


def test_user_errors_exit_2(tiny, tmp_path, capsys) -> None:
    model, pairs = tiny
    assert main(["run", "--model", str(model), "--task", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["run", "--model", str(model), "--task", str(pairs), "--method", "atp-star", "--out", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["verify", "--model", str(model), "--task", str(pairs), "--estimate", str(tmp_path / "none"),
                 "--out", str(tmp_path)]) == 2
    assert "no saved attribution" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "run", "compare", "verify", "bound", "models", "methods"])
def test_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--" in capsys.readouterr().out or command in ("models", "methods")


def test_models_and_methods(capsys) -> None:
    assert main(["models"]) == 0 and "smollm2-135m" in capsys.readouterr().out
    assert main(["methods"]) == 0 and "atp*" in capsys.readouterr().out


def test_parse_options() -> None:
    opts = parse_options(["samples=64", "blocks:block_size=8", "design=balanced"], ["subsampling", "blocks"])
    assert opts == {"subsampling": {"samples": 64, "design": "balanced"},
                    "blocks": {"samples": 64, "block_size": 8, "design": "balanced"}}
    assert build_parser().parse_args(["run", "--model", "m", "--task", "ioi"]).method == "atp*"


def test_verify_then_bound(tiny, tmp_path, capsys) -> None:
    model, pairs = tiny
    common = ["--model", str(model), "--task", str(pairs), "--no-progress", "--no-plots"]
    assert main(["run", *common, "--method", "atp", "--nodes", "head,value", "--out", str(tmp_path / "run")]) == 0
    assert main(["verify", *common, "--estimate", str(tmp_path / "run" / "estimate"), "--budget", "5",
                 "--out", str(tmp_path / "ver")]) == 0
    assert "exact effect" in capsys.readouterr().out
    meta = json.loads((tmp_path / "ver" / "verified.json").read_text())
    assert len(meta["nodes"]) == 5 and meta["node_types"] == ["value", "head"]
    assert main(["bound", *common, "--verified", str(tmp_path / "ver" / "verified"), "--theta", "0.01",
                 "--samples", "16", "--out", str(tmp_path / "bnd")]) == 0
    printed = capsys.readouterr().out
    assert "max_effect_upper" in printed and "assumption" in printed
    bound = json.loads((tmp_path / "bnd" / "bound.json").read_text())
    assert bound["n_unverified"] == 2 * 2 * 4 * 14 - 5 and 0 <= bound["prob_upper"] <= 1
    assert "Bound on remaining false negatives" in (tmp_path / "bnd" / "report.html").read_text()


def test_workers_on_a_method_that_cannot_split_exit_2(tiny, tmp_path, capsys, monkeypatch) -> None:
    from atpstar.methods import METHODS

    model, pairs = tiny
    monkeypatch.setattr(METHODS["atp"].cls, "seeded", True)  # every built-in method splits now: pretend one cannot
    code = main(["run", "--model", str(model), "--task", str(pairs), "--method", "atp", "--workers", "2",
                 "--out", str(tmp_path), "--no-progress", "--no-plots"])
    assert code == 2 and "does not run on workers" in capsys.readouterr().err
