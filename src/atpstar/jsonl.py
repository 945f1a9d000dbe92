"""User prompt pairs from a JSON-lines file.

One object per line::

    {"clean": "When Mary and John went to the store, John gave a drink to", "noise": "...", "answer": " Mary", "distractor": " John"}

``distractor`` is optional: with it on every line the metric is the logit difference answer minus
distractor at the last position, without it on every line the log-probability of the answer. Blank
lines and lines starting with ``#`` are skipped. Errors name the line number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InputError
from .pairs import PromptPairs, check_answers_differ
from .validate import check_known_tokens, check_single_token

REQUIRED = ("clean", "noise", "answer")
OPTIONAL = ("distractor",)


def read_pairs_jsonl(path: str | Path, tokenizer: Any) -> PromptPairs:
    """Read prompt pairs from a JSON-lines file and tokenize them.

    Args:
        path: the ``.jsonl`` file.
        tokenizer: the model's tokenizer (``encode(text, add_special_tokens=False)``).

    Returns:
        ``PromptPairs`` with metric ``"logit_diff"`` when every line has a distractor, else ``"logprob"``.

    Raises:
        InputError: missing file, invalid JSON, missing or unknown keys, non-string values, a clean
            and noise prompt of different token lengths, pairs of different lengths, or an answer or
            distractor that is not exactly one token — each with its line number.

    Example:
        >>> import json, tempfile, atpstar
        >>> model = atpstar.load_model("toy-ioi")
        >>> line = {"clean": "When Mary and John went to the store, John gave a book to",
        ...         "noise": "When Lisa and Paul went to the store, Mark gave a book to", "answer": " Mary", "distractor": " John"}
        >>> with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as handle:
        ...     _ = handle.write(json.dumps(line) + "\\n")
        >>> atpstar.read_pairs_jsonl(handle.name, model.tokenizer)
        PromptPairs(n_pairs=1, seq_len=14, metric='logit_diff')
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompt pair file {path} does not exist")
    if tokenizer is None or not hasattr(tokenizer, "encode"):
        raise InputError("reading prompt pairs from text needs the model's tokenizer, but the model has none")
    records: list[tuple[int, dict[str, str]]] = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM opens some UTF-8 files
            except UnicodeDecodeError as err:
                raise InputError(
                    f"{path}:{number}: not UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1}); save the "
                    "file as UTF-8"
                ) from None
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            records.append((number, _parse(path, number, line)))
    if not records:
        raise InputError(f"{path}: no prompt pairs (expected one JSON object per line with keys {list(REQUIRED)})")
    with_distractor = [number for number, r in records if "distractor" in r]
    if with_distractor and len(with_distractor) != len(records):
        missing = next(number for number, r in records if "distractor" not in r)
        raise InputError(
            f"{path}:{missing}: no 'distractor', but line {with_distractor[0]} has one; give a distractor on every "
            "line (metric logit_diff) or on none (metric logprob)"
        )
    clean, noise, answer, distractor = [], [], [], []
    length0 = None
    for number, record in records:
        clean_ids = _encode(tokenizer, record["clean"])
        noise_ids = _encode(tokenizer, record["noise"])
        check_known_tokens(tokenizer, clean_ids, record["clean"], "clean prompt", f"{path}:{number}: ")
        check_known_tokens(tokenizer, noise_ids, record["noise"], "noise prompt", f"{path}:{number}: ")
        if len(clean_ids) != len(noise_ids):
            raise InputError(
                f"{path}:{number}: clean has {len(clean_ids)} tokens and noise has {len(noise_ids)}; they must have "
                "the same token length (patching aligns positions). Change names or words so both tokenize alike."
            )
        if clean_ids == noise_ids:
            raise InputError(
                f"{path}:{number}: clean and noise prompts are identical token for token; patching would change "
                "nothing (every effect 0). Make the noise prompt differ where the behaviour should change."
            )
        if length0 is None:
            length0 = (number, len(clean_ids))
        elif len(clean_ids) != length0[1]:
            raise InputError(
                f"{path}:{number}: this pair has {len(clean_ids)} tokens but line {length0[0]} has {length0[1]}; all "
                "pairs in one file must have the same token length (split the file by length)"
            )
        if not clean_ids:
            raise InputError(f"{path}:{number}: the clean prompt is empty")
        clean.append(clean_ids)
        noise.append(noise_ids)
        answer.append(_single(tokenizer, record["answer"], "answer", path, number))
        if with_distractor:
            distractor.append(_single(tokenizer, record["distractor"], "distractor", path, number))
    if with_distractor:
        check_answers_differ(answer, distractor, [f"{path}:{number}" for number, _ in records])
    metric = "logit_diff" if with_distractor else "logprob"
    return PromptPairs(clean, noise, answer, distractor if with_distractor else None, metric=metric)


def _parse(path: Path, number: int, line: str) -> dict[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno})") from err
    if not isinstance(record, dict):
        raise InputError(
            f"{path}:{number}: expected a JSON object with keys {list(REQUIRED)}; got {type(record).__name__}"
        )
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise InputError(
            f"{path}:{number}: missing key(s) {missing}; each line needs {list(REQUIRED)} (and optionally 'distractor')"
        )
    unknown = sorted(set(record) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise InputError(f"{path}:{number}: unknown key(s) {unknown}; allowed: {list(REQUIRED + OPTIONAL)}")
    for key, value in record.items():
        if not isinstance(value, str):
            raise InputError(f"{path}:{number}: {key!r} must be a string; got {type(value).__name__}")
    return record


def _encode(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]


def _single(tokenizer: Any, text: str, what: str, path: Path, number: int) -> int:
    return check_single_token(tokenizer, text, what, f"{path}:{number}: ")
