"""A MIB submission folder: one folder per task-model pair holding the score file or the nine circuits.

Layout (design record 0019), under a method's folder ``<method>_patching_edge``:

- scores: ``<task>_<model>/importances.json`` (or ``.pt``), every edge with its MIB score;
- circuits: ``abs-False/<task>_<model>/circuit_<fraction>.json`` for the nine fractions 0.001 … 0.5,
  ranked by signed score (what CPR evaluates), and ``abs-True/...`` ranked by |score| (CMD); each
  circuit has at most ⌊fraction · N⌋ edges after MIB's pruning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..edges.circuits import MIB_FRACTIONS
from ..edges.mib import MIB_BATCH_SIZE
from ..errors import InputError
from .names import check_pair

FORMS = ("scores", "circuits")
CIRCUIT_FRACTIONS: tuple[float, ...] = tuple(x for x in MIB_FRACTIONS if x < 1)  # the nine circuits


def write_submission(
    result: Any,
    root: str | Path,
    task: str,
    model: str,
    *,
    form: str = "scores",
    suffix: str = ".json",
    batch_size: int = MIB_BATCH_SIZE,
    convention: str = "mib",
) -> list[Path]:
    """Write ``result``'s edges as MIB expects a submission for (task, model) under ``root``.

    Args:
        result: a noising ``Attribution`` with position-summed edges.
        root: the method's folder (``<method>_patching_edge``); task-model folders go inside.
        task, model: MIB's ids (``names.TASKS``, ``names.MODELS``).
        form: ``"scores"`` (one score file) or ``"circuits"`` (nine circuits per ranking).
        suffix: ``.json`` or ``.pt``.
        batch_size, convention: as ``Attribution.to_mib``.

    Returns:
        The files written.
    """
    name = check_pair(task, model)
    if form not in FORMS:
        raise InputError(f"unknown submission form {form!r}; choose one of {list(FORMS)}")
    if suffix not in (".json", ".pt"):
        raise InputError(f"MIB circuit files end in .json or .pt; got {suffix!r}")
    root = Path(root)
    options = {"batch_size": batch_size, "convention": convention}
    if form == "scores":
        return [result.to_mib(root / name / f"importances{suffix}", **options)]
    n_edges = result.edge_graph().n_edges
    written = []
    for absolute in (False, True):
        folder = root / f"abs-{absolute}" / name
        for fraction in CIRCUIT_FRACTIONS:
            path = folder / f"circuit_{fraction:g}{suffix}"
            written.append(result.to_mib(path, int(fraction * n_edges), True, absolute=absolute, **options))
    return written


def submission_folders(root: str | Path, name: str) -> dict[bool | None, Path]:
    """The task-model folders of a submission: {None: root/name} (one ranking for both areas) or
    {False: root/abs-False/name, True: root/abs-True/name}."""
    root = Path(root)
    found: dict[bool | None, Path] = {}
    if (root / name).is_dir():
        found[None] = root / name
    for absolute in (False, True):
        if (root / f"abs-{absolute}" / name).is_dir():
            found[absolute] = root / f"abs-{absolute}" / name
    if not found:
        raise InputError(f"no MIB submission folder {name} under {root}; write one with write_submission")
    return found
