"""One function per ``atpstar`` command, each taking the parsed arguments and returning the exit code."""

from __future__ import annotations

import argparse
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..persist import save_json, write_text
from ..spaces import Spaces, spaces_for
from .circuit import cmd_circuit
from .common import (
    bound_unverified,
    cached_or_run,
    check_methods,
    check_saved,
    load_model,
    load_task,
    out_dir,
    parse_nodes,
    plain,
    resumable,
    run_method,
    say,
    verify_and_save,
)
from .find_command import cmd_find
from .mib_command import cmd_mib
from .output import finish_run, prompts, tokens


def cmd_models(args: argparse.Namespace) -> int:
    from ..families import supported_text
    from ..zoo import BUILTIN_MODELS

    width = max(len(name) for name in BUILTIN_MODELS)
    for name, description in BUILTIN_MODELS.items():
        print(f"{name:<{width}}  {description}")
    print("\nAny Hugging Face causal LM of these families (config.model_type) loads by hub id or folder:")
    print(supported_text())
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from ..methods import METHODS

    width = max(len(name) for name in METHODS)
    for name, entry in METHODS.items():
        print(f"{name:<{width}}  {entry.cls.summary}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .. import tasks

    start = time.monotonic()
    nodes = parse_nodes(args.nodes)
    out = out_dir(args)
    model = load_model(args)
    pairs = tasks.ioi(model.tokenizer, args.pairs, seed=args.seed)
    task = f"ioi ({pairs.n_pairs} pairs, seed {args.seed}, metric {pairs.metric_name})"
    estimate = run_method(model, pairs, "atp*", nodes, {}, args)
    verified = verify_and_save(model, pairs, estimate, args.budget, None, args) if args.budget > 0 else None
    bound = None
    if verified is not None and args.bound_samples > 0:
        bound = bound_unverified(model, pairs, verified, None, args.bound_samples, 0.5, 0.05, args.seed, args)
    finish_run(args, out, model, pairs, task, estimate, verified, bound, start, title="atpstar demo")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ..methods import METHODS

    start = time.monotonic()
    nodes = parse_nodes(args.nodes)
    options = check_methods(args, [args.method], nodes)[args.method]  # before the model loads
    out = out_dir(args)
    checkpoint = None
    if METHODS[args.method].cls.exact and "checkpoint" not in options:
        # the exhaustive sweep resumes on rerun when interrupted (a folder of work-unit files, in-process or on workers)
        checkpoint = resumable(out / "estimate.units")
        options["checkpoint"] = str(checkpoint)
    model = load_model(args)
    pairs, task = load_task(model, args)
    estimate = run_method(model, pairs, args.method, nodes, options, args)
    verified = verify_and_save(model, pairs, estimate, args.verify, None, args) if args.verify > 0 else None
    finish_run(args, out, model, pairs, task, estimate, verified, None, start, title=f"atpstar run: {args.method}")
    if checkpoint is not None:
        _discard(checkpoint)  # the estimate is saved; the partial sweep is no longer needed
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ..result import Attribution

    start = time.monotonic()
    estimate = Attribution.load(args.estimate)
    out, model, pairs, task = _continue_from(args, estimate, f"estimate {args.estimate}")
    verified = verify_and_save(model, pairs, estimate, args.budget, args.threshold, args)
    finish_run(
        args, out, model, pairs, task, estimate, verified, None, start, title="atpstar verify", save_estimate=False
    )
    return 0


def cmd_bound(args: argparse.Namespace) -> int:
    from ..report import public_fields, write_report
    from ..verify import Verification

    start = time.monotonic()
    verified = Verification.load(args.verified)
    out, model, pairs, task = _continue_from(args, verified, f"verification {args.verified}")
    bound = bound_unverified(
        model, pairs, verified, args.theta, args.samples, args.p, args.alpha, args.bound_seed, args
    )
    facts = {k: v for k, v in public_fields(bound).items()}
    save_json(out / "bound.json", "bound", {**facts, "assumption": getattr(bound, "assumption", "")})
    for key, value in facts.items():
        print(f"{key}: {plain(value)}")
    if getattr(bound, "assumption", ""):
        print(f"assumption: {bound.assumption}")
    path = write_report(
        out / "report.html",
        [],
        title="atpstar bound",
        task=task,
        verified=verified,
        bound=bound,
        facts={"model": model.model_id, "wall time": f"{time.monotonic() - start:.1f} s"},
    )
    say(f"wrote {out / 'bound.json'} and {path}")
    return 0


def _continue_from(args: argparse.Namespace, saved: Any, what: str) -> tuple[Path, Any, Any, str]:
    """(output folder, model, pairs, task) of a command that continues a saved result, checked to be its."""
    out = out_dir(args)
    model = load_model(args)
    pairs, task = load_task(model, args)
    check_saved(saved.identity, model, pairs, args.direction, what)
    return out, model, pairs, task


def cmd_compare(args: argparse.Namespace) -> int:
    from ..report import write_report

    start = time.monotonic()
    out = out_dir(args)
    methods, options, nodes = _compare_methods(args)
    checkpoint = out / "ground_truth.units"
    if args.recompute and checkpoint.exists():
        say(f"--recompute: discarding {checkpoint}")
        _discard(checkpoint)
    model = load_model(args)
    pairs, task = load_task(model, args)
    spaces = Spaces(spaces_for(model, nodes))
    n_nodes = sum(math.prod(spaces.of(t).shape(t, pairs.seq_len)) for t in nodes)
    if args.k_max is not None and args.k_max > n_nodes:
        raise InputError(f"--k-max {args.k_max} is more than the {n_nodes} nodes of types {nodes}; lower it")
    truth_options = {"checkpoint": str(resumable(checkpoint))}
    truth = cached_or_run(out / "ground_truth", model, pairs, _exact_method(), nodes, truth_options, args)
    estimates = {
        m: cached_or_run(out / "estimates" / _file_name(m), model, pairs, m, nodes, options[m], args) for m in methods
    }
    evaluations, images = _evaluations(args, out, truth, estimates, nodes)
    if not args.no_plots:
        images += _comparison_plots(out, model, pairs, truth, estimates, nodes)
    truth.to_csv(out / "top_nodes_truth.csv", k=min(1000, sum(truth.scores[t].numel() for t in nodes)))
    facts = {
        f"wall time {name}": f"{a.info.get('wall_s', 0):.1f} s"
        for name, a in [("ground truth", truth), *estimates.items()]
    }
    facts["total wall time"] = f"{time.monotonic() - start:.1f} s"
    path = write_report(
        out / "report.html",
        [truth, *estimates.values()],
        title="atpstar compare",
        task=task,
        facts=facts,
        evaluations=evaluations,
        images=images,
        top=args.top,
        prompts=prompts(model, pairs),
    )
    say(f"wrote {path}")
    return 0


def _compare_methods(args: argparse.Namespace) -> tuple[list[str], dict[str, dict[str, Any]], list[str]]:
    """(method ids, their options, node types) of ``compare``, checked before the model loads."""
    from ..methods import METHODS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InputError(f"unknown method(s) {unknown}; choose from: {', '.join(METHODS)}")
    nodes = parse_nodes(args.nodes)
    options = check_methods(args, methods, nodes)  # every method, before the ground truth's first pass
    return methods, options, nodes


def _exact_method() -> str:
    """The method id of the ground truth: the registered exact method (exhaustive activation patching)."""
    from ..methods import METHODS

    return next(m for m, entry in METHODS.items() if entry.cls.exact)


def _evaluations(
    args: argparse.Namespace, out: Path, truth: Any, estimates: dict[str, Any], nodes: list[str]
) -> tuple[list[Any], list[tuple[str, Path]]]:
    """Cost of verified recall per setting: saved, printed, and plotted unless --no-plots."""
    from ..evaluate import evaluate

    settings = ["per_pair", "distribution"] if args.setting == "both" else [args.setting]
    evaluations, images = [], []
    for setting in settings:
        ev = evaluate(
            truth, estimates, setting=setting, node_types=nodes, k_max=args.k_max, verification=args.verification
        )
        evaluations.append(ev)
        ev.save(out / f"evaluation_{setting}.json")
        ev.to_csv(out / f"comparison_{setting}.csv")
        write_text(out / f"comparison_{setting}.md", ev.to_markdown() + "\n")
        print(f"\n## cost of verified recall: {setting} ({', '.join(nodes)}, K max {ev.k_max})\n")
        print(ev.to_markdown())
        if not args.no_plots:
            from ..plots import plot_cost_curves

            curves = plot_cost_curves(ev, out / f"cost_curves_{setting}")[0]
            images.append((f"Cost of verified recall ({setting})", curves))
    return evaluations, images


def _comparison_plots(
    out: Path, model: Any, pairs: Any, truth: Any, estimates: dict[str, Any], nodes: list[str]
) -> list[tuple[str, Path]]:
    """Estimates against the truth (the first and last gradient estimator), and the truth's heatmaps."""
    from ..methods import METHODS
    from ..plots import plot_estimate_vs_truth, plot_heatmaps

    gradient = [m for m in estimates if METHODS[m].cls.needs_gradients]
    shown = [estimates[m] for m in dict.fromkeys(gradient[:1] + gradient[-1:])] or list(estimates.values())[:2]
    images = [
        (
            "|estimate| against |exact effect| per pair; points far below the diagonal are false negatives",
            plot_estimate_vs_truth(truth, shown, out / "estimate_vs_truth", node_types=nodes)[0],
        )
    ]
    spaces = Spaces(spaces_for(model, nodes))
    mapped = [t for t in nodes if {"layer", "pos"} <= set(spaces.of(t).axes(t))]  # what a (layer x position) map shows
    if mapped:
        heatmaps = plot_heatmaps(truth, out / "heatmaps_truth", node_types=mapped, tokens=tokens(model, pairs))[0]
        images.append(("Exact contributions (ground truth)", heatmaps))
    return images


def _file_name(method: str) -> str:
    return method.replace("*", "_star").replace("+", "_")


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": cmd_demo,
    "run": cmd_run,
    "compare": cmd_compare,
    "verify": cmd_verify,
    "bound": cmd_bound,
    "find": cmd_find,
    "circuit": cmd_circuit,
    "mib": cmd_mib,
    "models": cmd_models,
    "methods": cmd_methods,
}


def _discard(checkpoint: Path) -> None:
    """Remove a checkpoint: a folder of work-unit files (or a file)."""
    if checkpoint.is_dir():
        shutil.rmtree(checkpoint)
    else:
        checkpoint.unlink(missing_ok=True)
