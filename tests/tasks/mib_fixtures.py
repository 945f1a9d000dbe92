"""MIB dataset files in the released schema (``mib-bench/*`` on the Hugging Face hub), written by the tests.

Rows carry the columns MIB's loader reads (``prompt``, ``choices``, ``answerKey``, ``metadata``, ``label``,
``operator`` and the counterfactual columns, each a struct with its own ``prompt``/``choices``/``answerKey``
or ``label``), laid out as the hub repositories are: ``data/<split>-00000-of-00001.parquet`` (MCQA under
its config folder ``4_answer_choices/``), or ``<split>.jsonl`` / ``<split>.csv``. Prompt lengths differ
from row to row; a few rows fail MIB's filters on purpose. The tokenizer is a word-level one whose
vocabulary fits the tiny test models (48 ids).
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Any

WORDS = [
    "[UNK]", "<s>", "When", "Then", "Mary", "John", "Anna", "Tom", "and", "went", "to", "the", "store", "park",
    ",", "gave", "a", "drink", "book", "The", "apple", "sky", "is", "red", "blue", "green", ".", "What", "color",
    "?", "A", "B", "C", ":", "Answer", "+", "-", "=", "1", "2", "3", "4", "5", "6", "7", "8", "9", "Ann-Lee",
]  # fmt: skip


def tokenizer() -> Any:
    """A word-level tokenizer over ``WORDS`` (ids 0..47; ``<s>`` is BOS): every word is one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    assert len(WORDS) <= 48
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    # Digits one by one, as Llama-3's and Gemma's tokenizers split numbers: "11" is two tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>")


def _ioi_row(io: str, s: str, c: str, place: str, long: bool, flip_len: bool = False) -> dict[str, Any]:
    def prompt(a: str, b: str, giver: str) -> str:
        head = f"When {a} and {b} went to the {place} ,"
        return f"{head} {giver} gave a drink to" if long else f"{head} {giver} gave to"

    cf_prompt = prompt(io, s, io) + (" the" if flip_len else "")
    meta = {"subject": s, "indirect_object": io, "random_c": c, "place": place, "object": "drink"}
    return {
        "prompt": prompt(io, s, s),
        "choices": [io, s],
        "answerKey": 0,
        "metadata": meta,
        "s2_io_flip_counterfactual": {"prompt": cf_prompt, "choices": [io, s], "answerKey": 1, "metadata": meta},
        "abc_counterfactual": {"prompt": prompt("Anna", "Tom", "Tom"), "choices": ["Anna", "Tom"], "answerKey": 0},
    }


def ioi_rows() -> list[dict[str, Any]]:
    return [
        _ioi_row("Mary", "John", "Anna", "store", long=True),
        _ioi_row("John", "Mary", "Tom", "park", long=False),
        _ioi_row("Anna", "Tom", "Mary", "store", long=False),
        _ioi_row("Tom", "Anna", "John", "park", long=True),
        _ioi_row("Mary", "Tom", "Ann-Lee Tom", "park", long=True),  # random_c of two tokens: MIB drops it
        _ioi_row("John", "Anna", "Mary", "store", long=True, flip_len=True),  # noise one token longer: dropped
    ]


def _mc_row(colors: list[str], asked: int, letter_key: bool, cf_answer: int) -> dict[str, Any]:
    letters = ["A", "B", "C"][: len(colors)]
    things = ["apple", "sky", "apple"]

    def prompt(order: list[str]) -> str:
        facts = " ".join(f"The {things[i]} is {order[i]} ." for i in range(len(order)))
        options = " ".join(f"{letters[i]} : {order[i]}" for i in range(len(order)))
        return f"{facts} What color is the {things[asked]} ? {options} Answer :"

    shifted = colors[1:] + colors[:1]
    key: Any = letters[asked] if letter_key else asked
    return {
        "prompt": prompt(colors),
        "choices": {"label": letters, "text": colors},
        "answerKey": key,
        "symbol_counterfactual": {
            "prompt": prompt(shifted),
            "choices": {"label": letters, "text": shifted},
            "answerKey": letters[cf_answer] if letter_key else cf_answer,
        },
    }


def choice_rows(letter_key: bool = False) -> list[dict[str, Any]]:
    return [
        _mc_row(["red", "blue"], 0, letter_key, 1),
        _mc_row(["red", "blue", "green"], 1, letter_key, 2),
        _mc_row(["green", "red"], 1, letter_key, 0),
    ]


def arithmetic_rows() -> list[dict[str, Any]]:
    def row(a: int, b: int, op: str, ca: int, cb: int) -> dict[str, Any]:
        value = (lambda x, y: x + y) if op == "+" else (lambda x, y: x - y)
        return {
            "prompt": f"What is {a} {op} {b} ? Answer :" if a < 4 else f"{a} {op} {b} =",
            "label": value(a, b),
            "operator": op,
            "random_counterfactual": {"prompt": f"What is {ca} {op} {cb} ? Answer :" if a < 4 else f"{ca} {op} {cb} =",
                                      "label": value(ca, cb)},
        }  # fmt: skip

    return [
        row(2, 3, "+", 1, 3),
        row(5, 2, "+", 4, 4),
        row(6, 3, "+", 2, 9),  # counterfactual label 11: two tokens, dropped
        row(8, 3, "-", 9, 5),
        row(3, 1, "-", 2, 1),
        {"prompt": "1 + 1 =", "label": 2, "operator": "+", "random_counterfactual": None},  # no counterfactual
    ]


ROWS = {
    "ioi": ioi_rows,
    "mcqa": choice_rows,
    "arc_easy": lambda: choice_rows(letter_key=True),
    "arc_challenge": choice_rows,
    "arithmetic_addition": arithmetic_rows,
    "arithmetic_subtraction": arithmetic_rows,
}


def write(
    folder: Path, task: str, fmt: str | None = None, splits: tuple[str, ...] = ("train", "validation", "test")
) -> Path:
    """Write ``task``'s rows as its hub repository lays them out (``fmt`` None: parquet when pyarrow is
    installed, else jsonl); returns the repository folder."""
    rows = ROWS[task]()
    fmt = fmt or ("parquet" if importlib.util.find_spec("pyarrow") else "jsonl")
    for split in splits:
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            where = folder / ("4_answer_choices" if task == "mcqa" else "data")
            where.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), where / f"{split}-00000-of-00001.parquet")
        elif fmt == "jsonl":
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"{split}.csv", "w", newline="") as handle:
                columns = list(dict.fromkeys(k for r in rows for k in r))
                writer = csv.DictWriter(handle, columns)
                writer.writeheader()
                for r in rows:
                    writer.writerow(
                        {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()}
                    )  # fmt: skip  (None: an empty cell)
    return folder
