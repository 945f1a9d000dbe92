"""A pair whose distractor is its answer is refused, in code and in pair files, naming the pair."""

from __future__ import annotations

import json

import pytest

import atpstar
from atpstar.errors import InputError
from atpstar.jsonl import read_pairs_jsonl
from test_jsonl import WORDS, tokenizer  # noqa: F401  (the word-level tokenizer fixture)


def test_prompt_pairs_refuse_an_answer_equal_to_its_distractor() -> None:
    with pytest.raises(InputError, match=r"same token in pair 1 \(token 5\)"):
        atpstar.PromptPairs(clean=[[1, 2, 3], [1, 2, 3]], noise=[[1, 4, 3], [1, 6, 3]], answer=[5, 5], distractor=[6, 5])


def test_from_text_refuses_an_answer_equal_to_its_distractor(tokenizer) -> None:  # noqa: F811
    with pytest.raises(InputError, match="pair 0"):
        atpstar.PromptPairs.from_text(tokenizer, ["Paris is in"], ["Rome is in"], ["France"], ["France"])


def test_a_pair_file_names_the_line(tokenizer, tmp_path) -> None:  # noqa: F811
    good = {"clean": "Paris is in", "noise": "Rome is in", "answer": "France", "distractor": "Italy"}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "distractor": "France"}) + "\n")
    with pytest.raises(InputError, match=r"pairs.jsonl:2 \(token " + str(WORDS.index("France") + 1) + r"\)"):
        read_pairs_jsonl(path, tokenizer)


def test_distinct_answers_and_no_distractor_are_fine() -> None:
    atpstar.PromptPairs(clean=[[1, 2, 3]], noise=[[1, 4, 3]], answer=[5], distractor=[6])
    atpstar.PromptPairs(clean=[[1, 2, 3]], noise=[[1, 4, 3]], answer=[5], metric="logprob")
