"""The circuit-localization tasks of MIB (Mueller et al. 2025) from their released dataset files.

``mib(task, split, tokenizer=...)`` reads the Hugging Face datasets ``mib-bench/<name>`` (a local copy
of the repository, or the hub id, downloaded with ``huggingface_hub``) and builds the prompt pairs
exactly as MIB's circuit track does (``MIB_circuit_track/dataset.py``, ``HFEAPDataset``):

- ``ioi``: clean ``prompt``, noise ``<counterfactual>["prompt"]`` (default ``s2_io_flip_counterfactual``);
  answer ``" " + metadata["indirect_object"]``, distractor ``" " + metadata["subject"]``. Kept when the
  indirect object, the subject and ``random_c`` encode to the same number of tokens.
- ``mcqa`` (``copycolors_mcqa``, config ``4_answer_choices``), ``arc_easy``, ``arc_challenge``: clean
  ``prompt``, noise ``<counterfactual>["prompt"]`` (default ``symbol_counterfactual``); answer the correct
  choice letter ``choices["label"][answerKey]``, distractor the counterfactual's correct letter (the metric
  is the logit difference between the two letters). Kept when both letters have the same token count.
- ``arithmetic_addition``, ``arithmetic_subtraction``: clean ``prompt``, noise
  ``random_counterfactual["prompt"]``; answer ``str(label)``, distractor ``str(random_counterfactual["label"])``.
  Kept when both are one token, the counterfactual exists, and ``operator`` is the task's (``+``/``-``).

Answers and distractors count by their first token (MIB's ``input_ids[0]``); every prompt starts with
BOS (TransformerLens' ``prepend_bos=True``, which MIB uses); the metric is read at each prompt's last
token. Pairs whose clean and noise prompts differ in token length are dropped (patching aligns
positions; MIB's EAP-IG refuses such batches). ``n`` keeps the first n pairs after filtering, as MIB's
``num_examples``.
"""

from __future__ import annotations

import ast
import csv
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..pairsets import PairSet, prompt_tokens
from ._common import check_count

SPLITS = ("train", "validation", "test")
FORMATS = (".parquet", ".jsonl", ".json", ".csv")


@dataclass(frozen=True)
class MibTask:
    """One MIB task: where its files are and how a row becomes a pair.

    Attributes:
        hub_id: the Hugging Face dataset.
        config: the dataset config (a sub-folder of the repository) or None.
        counterfactual: the default counterfactual column.
        kind: ``"ioi"``, ``"choices"`` or ``"arithmetic"`` (how a row is read).
        operator: arithmetic only: the ``operator`` column value kept.
    """

    hub_id: str
    config: str | None
    counterfactual: str
    kind: str
    operator: str | None = None


TASKS: dict[str, MibTask] = {
    "ioi": MibTask("mib-bench/ioi", None, "s2_io_flip_counterfactual", "ioi"),
    "mcqa": MibTask("mib-bench/copycolors_mcqa", "4_answer_choices", "symbol_counterfactual", "choices"),
    "arithmetic_addition": MibTask("mib-bench/arithmetic_addition", None, "random_counterfactual", "arithmetic", "+"),
    "arithmetic_subtraction": MibTask(
        "mib-bench/arithmetic_subtraction", None, "random_counterfactual", "arithmetic", "-"
    ),
    "arc_easy": MibTask("mib-bench/arc_easy", None, "symbol_counterfactual", "choices"),
    "arc_challenge": MibTask("mib-bench/arc_challenge", None, "symbol_counterfactual", "choices"),
}

Example = tuple[str, str, str, str]  # clean prompt, noise prompt, answer text, distractor text


def mib(
    task: str,
    split: str = "validation",
    *,
    tokenizer: Any,
    counterfactual: str | None = None,
    path: str | Path | None = None,
    n: int | None = None,
    prepend_bos: bool = True,
) -> PairSet:
    """Prompt pairs of one MIB task and split, from MIB's released files.

    Args:
        task: ``ioi``, ``mcqa``, ``arithmetic_addition``, ``arithmetic_subtraction``, ``arc_easy`` or
            ``arc_challenge`` (MIB's folder spelling with ``-``, e.g. ``arc-easy``, works too).
        split: ``train``, ``validation`` or ``test`` (MIB evaluates on ``validation`` by default).
        tokenizer: the model's tokenizer (MIB filters by token counts, which depend on it).
        counterfactual: the counterfactual column the noise prompts come from; None: MIB's default.
        path: a local folder holding the dataset repository (or one data file), or a hub id; None: the
            task's hub id (downloaded by ``huggingface_hub`` into its cache).
        n: keep the first n pairs after filtering; None: all.
        prepend_bos: start every prompt with BOS (MIB does); False: as the tokenizer starts texts.

    Returns:
        A ``PairSet`` (groups of equal length; metric: logit difference of the answer and distractor
        first tokens at each prompt's last token), its ``info`` naming the source and the pairs dropped.

    Raises:
        InputError: unknown task or split, files or columns missing, or no pair left.

    Example:
        >>> pairs = atpstar.tasks.mib("ioi", "validation", tokenizer=model.tokenizer, path="data/ioi", n=16)
    """
    name = task.replace("-", "_")
    if name not in TASKS:
        raise InputError(f"unknown MIB task {task!r}; choose one of {list(TASKS)}")
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; MIB's datasets have {list(SPLITS)}")
    spec = TASKS[name]
    column = spec.counterfactual if counterfactual is None else counterfactual
    n = None if n is None else check_count("n", n)
    folder, source = _locate(spec, path)
    rows = read_rows(folder, split, spec.config)
    examples, filtered = _examples(rows, spec, column, tokenizer, source)
    kept, unequal = _equal_lengths(examples, tokenizer, prepend_bos)
    kept = kept if n is None else kept[:n]
    if not kept:
        raise InputError(
            f"no pair of MIB task {task!r} ({split}) is left: {filtered} rows failed MIB's token filters and {unequal} "
            "have clean and noise prompts of different token lengths for this tokenizer"
        )
    clean, noise, answer, distractor = (list(column_) for column_ in zip(*kept))
    pairs = PairSet.from_text(tokenizer, clean, noise, answer, distractor, "logit_diff", prepend_bos=prepend_bos)
    pairs.info = {
        "task": name,
        "split": split,
        "counterfactual": column,
        "source": source,
        "rows": len(rows),
        "dropped_by_filter": filtered,
        "dropped_unequal_length": unequal,
    }
    return pairs


def read_rows(folder: Path, split: str, config: str | None = None) -> list[dict[str, Any]]:
    """The rows of ``split`` in a dataset folder (parquet, jsonl, json or csv shards, in name order).

    A file belongs to the split when its name starts with it (``validation-00000-of-00001.parquet``,
    ``test.jsonl``) or it lies in a folder named after it; with ``config``, files under a folder of that
    name are preferred. A single file is read whatever its name.
    """
    if folder.is_file():
        return _read(folder)
    files = sorted(f for f in folder.rglob("*") if f.suffix in FORMATS and _in_split(f.relative_to(folder), split))
    if config is not None and any(config in f.relative_to(folder).parts for f in files):
        files = [f for f in files if config in f.relative_to(folder).parts]
    if not files:
        found = sorted({s for f in folder.rglob("*") if f.suffix in FORMATS for s in SPLITS if _in_split(f, s)})
        raise InputError(
            f"no {split!r} files ({'/'.join(FORMATS)}) under {folder}; splits found there: {found or 'none'}"
        )
    return [row for f in files for row in _read(f)]


def _in_split(relative: Path, split: str) -> bool:
    stem = relative.name.split(".")[0]
    return stem == split or stem.startswith((f"{split}-", f"{split}_")) or split in relative.parts[:-1]


def _read(file: Path) -> list[dict[str, Any]]:
    try:
        if file.suffix == ".parquet":
            try:
                import pyarrow.parquet as parquet
            except ImportError as err:
                raise InputError(f"reading {file} needs pyarrow: pip install 'atpstar[mib]'") from err
            return list(parquet.read_table(file).to_pylist())
        text = file.read_text(encoding="utf-8")
        if file.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        if file.suffix == ".json":
            data = json.loads(text)
            return list(data["data"] if isinstance(data, dict) and "data" in data else data)
        return [{k: _cell(v) for k, v in row.items()} for row in csv.DictReader(text.splitlines())]
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"cannot read MIB rows from {file}: {err}") from err


def _cell(value: str) -> Any:
    """A csv cell: nested columns (structs, lists) are written as JSON or Python literals, a missing value as
    an empty cell; others stay text."""
    if value == "":
        return None
    if value[:1] in "{[":
        for parse in (json.loads, ast.literal_eval):
            try:
                return parse(value)
            except (ValueError, SyntaxError):
                continue
    return value


def _locate(spec: MibTask, path: str | Path | None) -> tuple[Path, str]:
    """(local folder or file, description of the source)."""
    if path is not None and Path(path).exists():
        return Path(path), str(path)
    repo = spec.hub_id if path is None else str(path)
    if repo.count("/") != 1:
        raise InputError(
            f"MIB data {path!r} is neither an existing file or folder nor a hub id such as {spec.hub_id!r}"
        )
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id=repo, repo_type="dataset")
    except Exception as err:  # network, authentication or a missing repository: say which and how to work offline
        raise InputError(
            f"cannot download the MIB dataset {repo!r} from the Hugging Face hub ({type(err).__name__}: {err}); "
            "download the repository elsewhere and pass its folder as path="
        ) from err
    return Path(folder), repo


def _examples(
    rows: Sequence[Mapping[str, Any]], spec: MibTask, column: str, tokenizer: Any, source: str
) -> tuple[list[Example], int]:
    """(the examples MIB keeps, how many rows its filters dropped)."""
    read = _READERS[spec.kind]
    kept: list[Example] = []
    for i, row in enumerate(rows):
        try:
            example = read(row, column, tokenizer, spec)
        except (KeyError, TypeError, IndexError, ValueError) as err:
            raise InputError(
                f"{source}, row {i}: not in MIB's {spec.kind} schema ({type(err).__name__}: {err}); columns: "
                f"{sorted(row)}; counterfactual column {column!r}"
            ) from err
        if example is not None:
            kept.append(example)
    return kept, len(rows) - len(kept)


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _ioi(row: Mapping[str, Any], column: str, tokenizer: Any, spec: MibTask) -> Example | None:
    meta = row["metadata"]
    answer, distractor = f" {meta['indirect_object']}", f" {meta['subject']}"
    others = [f" {meta['random_c']}"] if meta.get("random_c") is not None else []
    if len({_count(tokenizer, text) for text in (answer, distractor, *others)}) != 1:
        return None
    return str(row["prompt"]), str(row[column]["prompt"]), answer, distractor


def _label(item: Mapping[str, Any]) -> str:
    """The correct choice letter: ``choices["label"][answerKey]`` (answerKey an index, or the letter itself)."""
    labels, key = list(item["choices"]["label"]), item["answerKey"]
    return str(labels[labels.index(key)] if isinstance(key, str) and key in labels else labels[int(key)])


def _choices(row: Mapping[str, Any], column: str, tokenizer: Any, spec: MibTask) -> Example | None:
    answer, distractor = _label(row), _label(row[column])
    if _count(tokenizer, answer) != _count(tokenizer, distractor):
        return None
    return str(row["prompt"]), str(row[column]["prompt"]), answer, distractor


def _arithmetic(row: Mapping[str, Any], column: str, tokenizer: Any, spec: MibTask) -> Example | None:
    other = row.get(column)
    if other is None or other.get("prompt") is None or row.get("operator") != spec.operator:
        return None
    answer, distractor = str(row["label"]), str(other["label"])
    if _count(tokenizer, answer) != 1 or _count(tokenizer, distractor) != 1:
        return None
    return str(row["prompt"]), str(other["prompt"]), answer, distractor


_READERS: dict[str, Callable[[Mapping[str, Any], str, Any, MibTask], Example | None]] = {
    "ioi": _ioi,
    "choices": _choices,
    "arithmetic": _arithmetic,
}


def _equal_lengths(examples: list[Example], tokenizer: Any, prepend_bos: bool) -> tuple[list[Example], int]:
    """The examples whose clean and noise prompts have the same token length, and how many were dropped."""
    kept = [
        e
        for e in examples
        if len(prompt_tokens(tokenizer, e[0], prepend_bos)) == len(prompt_tokens(tokenizer, e[1], prepend_bos))
    ]
    return kept, len(examples) - len(kept)
