"""MIB's circuit-localization track end to end: names, submission folders and MIB's evaluation.

``run_mib(model, pairs, out, task="ioi")`` runs a method on edges (MIB's head convention), writes the
submission folder MIB expects (``write_submission``) and evaluates it with MIB's procedure
(``evaluate_submission``: CPR from the signed ranking, CMD from the |score| ranking); design record 0019.
"""

from __future__ import annotations

from .evaluation import MibResult, MibScores, evaluate_folder, evaluate_submission
from .names import EDGE_COUNTS, MODELS, SCORED, TASKS, folder_name, method_folder, model_name_of
from .run import MibRun, run_mib
from .submission import CIRCUIT_FRACTIONS, submission_folders, write_submission

__all__ = [
    "CIRCUIT_FRACTIONS",
    "EDGE_COUNTS",
    "MODELS",
    "SCORED",
    "TASKS",
    "MibResult",
    "MibRun",
    "MibScores",
    "evaluate_folder",
    "evaluate_submission",
    "folder_name",
    "method_folder",
    "model_name_of",
    "run_mib",
    "submission_folders",
    "write_submission",
]
