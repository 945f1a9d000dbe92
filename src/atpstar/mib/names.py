"""MIB's names: tasks, models, the task-model pairs it scores, submission folders and edge counts.

From MIB's circuit-track code (``MIB_circuit_track/utils.py``, ``run_attribution.py``,
``run_evaluation.py``, the submission checker); design record 0019.
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError

# MIB task ids (its --tasks) and the hub datasets they read (mib-bench/<name>).
TASKS: dict[str, str] = {
    "ioi": "ioi",
    "mcqa": "copycolors_mcqa",
    "arithmetic_addition": "arithmetic_addition",
    "arithmetic_subtraction": "arithmetic_subtraction",
    "arc_easy": "arc_easy",
    "arc_challenge": "arc_challenge",
}
# MIB model ids (its --models) and their hub ids.
MODELS: dict[str, str] = {
    "gpt2": "gpt2-small",
    "qwen2.5": "Qwen/Qwen2.5-0.5B",
    "gemma2": "google/gemma-2-2b",
    "llama3": "meta-llama/Llama-3.1-8B",
}
# The task-model pairs of MIB's leaderboard (its COL_MAPPING), as folder names.
SCORED: tuple[str, ...] = (
    "ioi_gpt2",
    "ioi_qwen2.5",
    "ioi_gemma2",
    "ioi_llama3",
    "mcqa_qwen2.5",
    "mcqa_gemma2",
    "mcqa_llama3",
    "arithmetic-addition_llama3",
    "arithmetic-subtraction_llama3",
    "arc-easy_gemma2",
    "arc-easy_llama3",
    "arc-challenge_llama3",
)
# Edges of each model's graph (the submission checker's EDGE_COUNTS).
EDGE_COUNTS: dict[str, int] = {"gpt2": 32491, "qwen2.5": 179749, "gemma2": 74218, "llama3": 1592881}
# transformers model_type -> MIB model id, for naming a model MIB would call by that id.
FAMILY_MODEL: dict[str, str] = {"gpt2": "gpt2", "qwen2": "qwen2.5", "gemma2": "gemma2", "llama": "llama3"}
ABLATION = "patching"  # MIB's default ablation: counterfactual patching
LEVEL = "edge"


def folder_name(task: str, model: str) -> str:
    """MIB's folder of a task-model pair: ``<task>_<model>``, the task's underscores as dashes (``arc-easy_gemma2``)."""
    if task not in TASKS:
        raise InputError(f"unknown MIB task {task!r}; choose one of {list(TASKS)}")
    if model not in MODELS:
        raise InputError(f"unknown MIB model {model!r}; choose one of {list(MODELS)}")
    return f"{task.replace('_', '-')}_{model}"


def method_folder(method: str) -> str:
    """MIB's ``method_name_saveable``: ``<method>_<ablation>_<level>`` (``atp_star_patching_edge``)."""
    return f"{method.replace('*', '_star').replace('+', '_')}_{ABLATION}_{LEVEL}"


def model_name_of(model: Any) -> str:
    """The MIB model id of a wrapped model's family (its config's ``model_type``)."""
    model_type = getattr(model.hf_model.config, "model_type", "")
    if model_type not in FAMILY_MODEL:
        raise InputError(
            f"no MIB model id for model type {model_type!r}; pass the MIB model name ({list(MODELS)}) explicitly"
        )
    return FAMILY_MODEL[model_type]


def check_pair(task: str, model: str) -> str:
    """The folder name of a pair MIB scores; other pairs are refused (MIB's evaluation skips them)."""
    name = folder_name(task, model)
    if name not in SCORED:
        raise InputError(f"MIB does not score {task} on {model}; its pairs are {list(SCORED)}")
    return name
