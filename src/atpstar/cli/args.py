"""Argparse options shared by several ``atpstar`` commands (model, task, output, workers).

The command parsers (``parser``, ``find_command``, ``circuit``) import these; this module imports none of them.
"""

from __future__ import annotations

import argparse
from typing import Any


def command(
    sub: Any, name: str, help_text: str, description: str, *, task: bool = True, default_model: str | None = None
) -> argparse.ArgumentParser:
    """A command's sub-parser with the model options and (unless ``task=False``) the task options."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=description)
    model_args(parser, default_model)
    if task:
        task_args(parser)
    return parser


def outputs(parser: argparse.ArgumentParser, default_out: str, *, workers: bool = True, plots: bool = True) -> None:
    """The closing options of a command: where it runs (unless ``workers=False``) and what it writes
    (``plots=False``: the command draws no plots, so it runs without matplotlib)."""
    if workers:
        worker_args(parser)
    output_args(parser, default_out)
    parser.set_defaults(draws_plots=plots)  # checked before the model loads (``checks.check_args``)


def model_args(parser: argparse.ArgumentParser, default_model: str | None = None) -> None:
    """--model (required unless ``default_model``), --dtype, --device, --direction, --threads."""
    help_text = "built-in name (see 'atpstar models'), a local folder with config.json, or a Hugging Face hub id"
    if default_model:
        parser.add_argument("--model", default=default_model, help=f"{help_text} (default {default_model})")
    else:
        parser.add_argument("--model", required=True, help=help_text)
    parser.add_argument("--dtype", default="float32", help="dtype to compute in: float32 (default), float64, bfloat16")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument(
        "--direction",
        choices=["noising", "denoising"],
        default="noising",
        help="noising: patch noise activations into the clean run (the paper's, default); "
        "denoising: patch clean activations into the noise run",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--dictionary",
        action="append",
        default=[],
        metavar="PATH",
        help="an SAE or transcoder (SAELens, Gemma Scope 2 or circuit-tracer folder, or a hub id) whose latents and "
        "error are nodes too (node types NAME and NAME.error); repeatable",
    )


def attach_dictionaries(args: argparse.Namespace) -> list[str]:
    """Load and attach every ``--dictionary`` (before the node types are parsed) and add their node types to
    ``--nodes`` unless it names one of them; returns their node types."""
    paths = getattr(args, "dictionary", None) or []
    if not paths:
        return []
    from ..dictionaries import load_dictionary
    from ..spaces.latents import attach

    added: list[str] = []
    for path in paths:
        types = attach([load_dictionary(path)])
        listed = str(getattr(args, "nodes", "") or "").split(",")
        if hasattr(args, "nodes") and not set(types) & set(listed):
            args.nodes = ",".join([*filter(None, listed), *types])
        added += types
    return added


def worker_args(parser: argparse.ArgumentParser) -> None:
    """--workers and --ray-address: where exact patching, verification and the bounds run."""
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="run exact patching, verification, subsampling, blocks, hierarchical and the bound on N Ray workers "
        "(one per GPU when the cluster has GPUs; needs pip install 'atpstar[distributed]'; default: in-process)",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="Ray cluster to join with --workers: 'auto' (the running cluster) or ray://host:10001 "
        "(default: start a local Ray instance)",
    )


def task_args(parser: argparse.ArgumentParser) -> None:
    """--task, --n-pairs, --seed, --seq-len: the prompt pairs."""
    parser.add_argument(
        "--task",
        required=True,
        help="ioi, cities, random (pairs of model samples, metric: log-prob of the clean next "
        'token), a .jsonl file with one {"clean", "noise", "answer", "distractor"} '
        "object per line (distractor optional: metric logprob instead of logit difference), or a MIB task "
        "mib:<task>[:<split>] (ioi, mcqa, arithmetic_addition, arithmetic_subtraction, arc_easy, arc_challenge; "
        "split default validation; prompts of several lengths: edges only)",
    )
    parser.add_argument(
        "--mib-path", default=None, metavar="PATH",
        help="for --task mib:...: a local copy of the dataset repository, or a hub id (default: mib-bench/<task>)",
    )  # fmt: skip
    parser.add_argument(
        "--counterfactual", default=None, metavar="COLUMN",
        help="for --task mib:...: the counterfactual column of the noise prompts (default: MIB's for the task)",
    )  # fmt: skip
    parser.add_argument(
        "--n-pairs", type=int, default=4, metavar="N", help="prompt pairs for ioi/cities/random (default 4)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt draw (default 0)")
    parser.add_argument("--seq-len", type=int, default=16, help="prompt length for --task random (default 16)")


def output_args(parser: argparse.ArgumentParser, default_out: str) -> None:
    """--out, --top, --no-progress, --no-plots."""
    parser.add_argument("--out", default=default_out, help=f"output folder (default {default_out})")
    parser.add_argument("--top", type=int, default=20, help="rows of the printed table and report (default 20)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-plots", action="store_true", help="skip plots (no matplotlib needed)")
