"""Prompt pairs from JSON lines: good files and every bad line reported with its number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from atpstar import AtpstarError
from atpstar.jsonl import read_pairs_jsonl

WORDS = ["Hello", "Paris", "is", "in", "France", "Rome", "Italy", "big", "the", "city"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *WORDS])}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def _write(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_reads_pairs_and_picks_metric(tokenizer, tmp_path) -> None:
    path = _write(tmp_path / "p.jsonl", [
        {"clean": "Paris is in", "noise": "Rome is in", "answer": "France", "distractor": "Italy"},
        "",
        "# a comment",
        {"clean": "Rome is in", "noise": "Paris is in", "answer": "Italy", "distractor": "France"},
    ])
    pairs = read_pairs_jsonl(path, tokenizer)
    assert pairs.n_pairs == 2 and pairs.seq_len == 3 and pairs.metric_name == "logit_diff"
    assert pairs.answer.tolist() == [WORDS.index("France") + 1, WORDS.index("Italy") + 1]
    no_distractor = _write(tmp_path / "q.jsonl", [{"clean": "Paris is in", "noise": "Rome is in", "answer": "France"}])
    assert read_pairs_jsonl(no_distractor, tokenizer).metric_name == "logprob"


GOOD = {"clean": "Paris is in", "noise": "Rome is in", "answer": "France"}


@pytest.mark.parametrize("bad, message", [
    ("{oops", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"clean": "Paris is in", "answer": "France"}, "missing key"),
    ({**GOOD, "colour": "red"}, "unknown key"),
    ({**GOOD, "answer": 3}, "must be a string"),
    ({**GOOD, "noise": "Rome is in the big city"}, "same token length"),
    ({**GOOD, "clean": "Paris is", "noise": "Rome is"}, "same token length"),
    ({**GOOD, "answer": "big city"}, "exactly one token"),
    ({**GOOD, "answer": "Berlin"}, "outside the tokenizer's vocabulary"),
    ({**GOOD, "distractor": "Italy"}, "give a distractor on every line"),
])
def test_bad_line_reports_line_number(tokenizer, tmp_path, bad, message) -> None:
    path = _write(tmp_path / "bad.jsonl", [GOOD, bad])
    with pytest.raises(AtpstarError, match=message) as info:
        read_pairs_jsonl(path, tokenizer)
    assert "bad.jsonl:2" in str(info.value) or ("distractor" in message and "bad.jsonl:1" in str(info.value))


def test_missing_and_empty_files(tokenizer, tmp_path) -> None:
    with pytest.raises(AtpstarError, match="does not exist"):
        read_pairs_jsonl(tmp_path / "none.jsonl", tokenizer)
    with pytest.raises(AtpstarError, match="no prompt pairs"):
        read_pairs_jsonl(_write(tmp_path / "empty.jsonl", ["# nothing"]), tokenizer)
