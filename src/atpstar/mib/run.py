"""``run_mib``: a method on a MIB task and model, its submission folder, and MIB's evaluation of it.

Writes under ``out``:

- ``<method>.edges.json`` + safetensors: the attribution (reused on a rerun when it was made by the same
  computation: model, tokenizer, pairs, metric, method and options; another one is refused; a GradDrop
  result saved without its sign, design record 0029, is computed again);
- ``submission/<method>_patching_edge/...``: the submission folder (``submission.write_submission``);
- ``results/<method>_patching_edge/<task>_<model>_<split>_abs-<False|True>.json``: MIB's numbers per
  ranking, and ``<method>.mib.json`` (CPR, CMD, both results, cost, the identity they were made for),
  reused on a rerun with the same identity and submission files;
- ``<method>.faithfulness.json``, ``mib_table.md`` and ``mib.png``: the curve, a table and a plot.

Progress: the method's own progress bar, then one over the circuit forwards. Exact patching resumes
from its checkpoint folder (``options={"checkpoint": ...}``), as every sweep does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..edges.circuits import SIGN
from ..edges.mib import MIB_BATCH_SIZE
from ..fingerprint import RESULT_FIELDS, check_identity, identity
from ..persist import bundle_exists, write_text
from .evaluation import MibScores, evaluate_submission
from .names import check_pair, method_folder, model_name_of
from .submission import submission_folders, write_submission


@dataclass
class MibRun:
    """What ``run_mib`` made: the attribution, the submission files and MIB's scores."""

    result: Any
    files: list[Path]
    scores: MibScores
    folder: Path


def run_mib(
    model: Any,
    pairs: Any,
    out: str | Path,
    *,
    task: str,
    model_name: str | None = None,
    method: str = "atp*",
    options: dict[str, Any] | None = None,
    form: str = "scores",
    split: str = "validation",
    batch_size: int = MIB_BATCH_SIZE,
    progress: bool = False,
    eval_options: dict[str, Any] | None = None,
) -> MibRun:
    """Run ``method`` on edges, write MIB's submission for (task, model), evaluate it as MIB does.

    Args:
        model: an ``atpstar.Model`` (or a ``transformers`` causal LM).
        pairs: the task's prompt pairs (clean = MIB's clean prompt, noise = its counterfactual).
        out: output folder.
        task: MIB's task id (``names.TASKS``); model_name: MIB's model id (None: from the model's family).
        method, options: the attribution method and its options; ``edge_convention`` defaults to ``"mib"``.
        form: ``"scores"`` or ``"circuits"`` (``submission.write_submission``).
        split: the split named in the result files.
        batch_size: MIB's attribution batch size (the scale of the scores).
        eval_options: ``batch_size``/``memory_gb`` of the circuit forwards.
    """
    from ..api import attribute
    from ..model import as_model

    if model_name is not None:
        check_pair(task, model_name)  # a pair MIB does not score is refused before the model is touched
    model = as_model(model)
    model_name = model_name or model_name_of(model)
    name = check_pair(task, model_name)
    out = Path(out)
    options = {"edge_convention": "mib", **(options or {})}
    result = _attribution(model, pairs, out / f"{_stem(method)}.edges", method, options, progress, attribute)
    root = out / "submission" / method_folder(method)
    files = write_submission(result, root, task, model_name, form=form, batch_size=batch_size)
    scores = _evaluated(model, pairs, root, name, files, out / f"{_stem(method)}.mib.json", progress, eval_options)
    results = out / "results" / method_folder(method)
    for absolute, part in ((False, scores.signed), (True, scores.absolute)):
        write_text(results / f"{name}_{split}_abs-{absolute}.json", json.dumps(part.__dict__, indent=2))
    if scores.curve is not None:
        scores.curve.method = method
        scores.curve.save(out / f"{_stem(method)}.faithfulness.json")
    return MibRun(result, files, scores, root / name)


def _stem(method: str) -> str:
    return method.replace("*", "_star").replace("+", "_")


def _attribution(model: Any, pairs: Any, base: Path, method: str, options: dict, progress: bool, attribute: Any) -> Any:
    """The saved attribution at ``base`` if the same computation made it, else a fresh one (saved)."""
    from ..methods import build_method
    from ..result import Attribution

    current = identity(model, pairs, "noising", ["edge"], method, build_method(method, **options).get_options())
    if bundle_exists(base):
        saved = Attribution.load(base)
        fix = "Use another output folder, or delete the saved result to compute it again."
        check_identity(saved.identity, current, f"saved result {base}.json", fix, fields=RESULT_FIELDS)
        if not (saved.options.get("grad_drop") and SIGN not in saved.extras):
            return saved  # a GradDrop result saved before it kept its sign is made again (0029)
    result = attribute(model, pairs, method, ["edge"], direction="noising", progress=progress, **options)
    result.save(base)
    return result


def _evaluated(
    model: Any, pairs: Any, root: Path, name: str, files: list[Path], record: Path, progress: bool, options: Any
) -> MibScores:
    """MIB's evaluation of the submission, reused from ``record`` when made for these pairs and files."""
    from .evaluation import MibResult

    digest = hashlib.sha256(b"".join(Path(f).read_bytes() for f in files)).hexdigest()
    made_for = {**identity(model, pairs, "noising"), "submission": digest}
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("made_for") == json.loads(json.dumps(made_for)):
            return MibScores(MibResult(**saved["signed"]), MibResult(**saved["absolute"]), saved.get("cost", {}))
    scores = evaluate_submission(model, pairs, submission_folders(root, name), progress=progress, **(options or {}))
    write_text(record, json.dumps({**scores.to_dict(), "made_for": made_for}, indent=2))
    return scores
