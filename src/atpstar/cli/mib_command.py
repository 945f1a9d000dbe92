"""``atpstar mib``: a method on a MIB task and model, the submission folder MIB expects, MIB's evaluation."""

from __future__ import annotations

import argparse
import time

from ..persist import write_text
from .args import command, outputs
from .common import check_methods, load_model, load_task, out_dir, say

HELP = "MIB circuit-track submission folder and MIB's evaluation (CPR/CMD)"
DESCRIPTION = (
    "Run an edge method (MIB's head convention), write the submission folder MIB expects "
    "(OUT/submission/<method>_patching_edge/<task>_<model>/: the score file or the nine circuits), "
    "evaluate it as MIB does (counterfactual patching of the edges outside each circuit at MIB's ten "
    "fractions; CPR from the signed ranking, CMD from the |score| ranking) and write MIB's numbers "
    "(OUT/results/...), the curve, a table and a plot. A rerun reuses what was already made for the "
    "same computation."
)


def add_mib_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    mib = command(sub, "mib", HELP, DESCRIPTION)
    mib.add_argument("--method", default="atp*", help="an edge method: atp, atp+ig, atp*, activation_patching, ...")
    mib.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a method option, repeatable")
    mib.add_argument("--mib-task", default=None, help="MIB's task id for the folder names (default: --task)")
    mib.add_argument(
        "--mib-model", default=None, help="MIB's model id: gpt2, qwen2.5, gemma2, llama3 (default: by family)"
    )
    mib.add_argument("--form", choices=["scores", "circuits"], default="scores", help="one score file or nine circuits")
    mib.add_argument(
        "--split", default=None, help="the split named in the result files (default: --task's, else validation)"
    )
    mib.add_argument("--mib-batch-size", type=int, default=20, help="MIB's attribution batch size B (scores / B)")
    outputs(mib, "out/mib", workers=False)


def cmd_mib(args: argparse.Namespace) -> int:
    from ..edges.report import curve_table, plot_curves
    from ..mib import run_mib

    start = time.monotonic()
    options = check_methods(args, [args.method], ["edge"])[args.method]
    if args.direction != "noising":
        from ..errors import InputError

        raise InputError("MIB patches clean runs with counterfactual values: use --direction noising")
    out = out_dir(args)
    model = load_model(args)
    pairs, task = load_task(model, args)
    mib_task, split = _mib_names(args)
    say(f"{args.method} on {task}: MIB submission and evaluation")
    made = run_mib(
        model,
        pairs,
        out,
        task=mib_task,
        model_name=args.mib_model,
        method=args.method,
        options=options,
        form=args.form,
        split=split,
        batch_size=args.mib_batch_size,
        progress=not args.no_progress,
    )
    scores = made.scores
    table = f"| method | CPR ↑ | CMD ↓ |\n|---|---|---|\n| {args.method} | {scores.cpr:.4f} | {scores.cmd:.4f} |"
    if scores.curve is not None:
        table = curve_table([scores.curve], {args.method: made.result.cost.forward_equivalents})
        if not args.no_plots:
            plot_curves([scores.curve], out / "mib.png", f"{model.model_id}: {mib_task} (MIB)")
    write_text(out / "mib_table.md", f"{task}\n\n{table}\n")
    print(table)
    say(f"wrote {made.folder} and {out}/ in {time.monotonic() - start:.1f} s")
    return 0


def _mib_names(args: argparse.Namespace) -> tuple[str, str]:
    """(MIB task id, split): --mib-task / --split, else from ``--task mib:<task>[:<split>]``, else --task."""
    parts = args.task.split(":") if args.task.startswith("mib:") else []
    task = args.mib_task or (parts[1] if len(parts) > 1 else args.task)
    split = args.split or (parts[2] if len(parts) > 2 else "validation")
    return task, split
