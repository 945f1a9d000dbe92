"""The ``atpstar`` command line: demo, run, compare, verify, bound, models, methods.

Every command writes into ``--out``: results as safetensors + JSON (``Attribution.save``), a CSV of
top nodes, plots (PNG and SVG) and a self-contained ``report.html``. User errors print
``error: ...`` to stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import AtpstarError, InputError

TASKS = ("ioi", "cities", "random")
NODE_GROUPS = {"all": ["neuron", "query", "key", "value", "head"], "attention": ["query", "key", "value", "head"],
               "qkv": ["query", "key", "value"]}
COMPARE_DEFAULT = "atp,atp+qkfix,atp*,subsampling,blocks,hierarchical"
DESCRIPTIONS = {
    "activation_patching": "exact: patch every node alone, one forward per node and pair (the ground truth)",
    "atp": "attribution patching: first-order estimate, 2 forwards + 1 backward per pair",
    "atp+qkfix": "AtP with the softmax recomputed exactly for queries and keys (attention saturation fix)",
    "atp+graddrop": "AtP averaged over backward passes with one layer's residual write dropped (cancellation fix)",
    "atp*": "AtP + QK fix + GradDrop, the paper's method (about 2 forwards + L/2+1 backwards per pair)",
    "subsampling": "patch random node subsets jointly; estimate = mean effect with the node in - mean without",
    "blocks": "patch fixed blocks of nodes jointly; each node scored by its block's |effect|",
    "hierarchical": "group testing: patch coarse blocks, split those with a large |effect|, down to single nodes",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) is None:
        parser.print_help()
        return 2
    try:
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        return int(COMMANDS[args.command](args) or 0)
    except AtpstarError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (a ground-truth sweep resumes from its checkpoint when rerun)", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atpstar",
        description="Find the components of a transformer LM that cause a behaviour: exact activation patching, "
                    "attribution patching (AtP) and AtP* (Kramár et al. 2024).",
        epilog="Run 'atpstar COMMAND --help' for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="AtP* on the built-in SmolLM2-135M with IOI prompts, top nodes verified",
                          description="The main job on the built-in default: SmolLM2-135M on IOI prompt pairs, AtP* "
                                      "over all node types, the top components verified by exact activation "
                                      "patching, a table printed and report.html written (~2 min on 2 CPU cores).")
    _model_args(demo, default_model="smollm2-135m")
    demo.add_argument("--pairs", type=int, default=4, metavar="N", help="number of IOI prompt pairs (default 4)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the prompt draw (default 0)")
    demo.add_argument("--nodes", default="all", help="node types: all, attention, qkv, or a comma list of "
                      "neuron,query,key,value,head (default all)")
    demo.add_argument("--budget", type=int, default=50, metavar="N",
                      help="nodes to verify by exact patching, in AtP* order (default 50)")
    demo.add_argument("--bound-samples", type=int, default=0, metavar="N",
                      help="if > 0, also bound the unverified nodes' effects with N subsampling samples (default 0: off)")
    _output_args(demo, "out/demo")

    run = sub.add_parser("run", help="one attribution method on a model and task",
                         description="Run one method, save the result (estimate.json + estimate.safetensors), "
                                     "a CSV of top nodes, heatmaps and report.html.")
    _model_args(run)
    _task_args(run)
    run.add_argument("--method", default="atp*", help="method id (see 'atpstar methods'; default atp*)")
    run.add_argument("--nodes", default="all", help="node types: all, attention, qkv, or a comma list (default all)")
    run.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                     help="a method option, repeatable, e.g. --option samples=128 (values parsed as JSON when they can be)")
    run.add_argument("--verify", type=int, default=0, metavar="N", help="also verify the top N nodes exactly (default 0)")
    _output_args(run, "out/run")

    compare = sub.add_parser("compare", help="compare methods by cost of verified recall against exhaustive patching",
                             description="Compute (or reuse from --out) the exhaustive ground truth by activation "
                                         "patching, run each method, and write cost-of-verified-recall tables "
                                         "(markdown + CSV), plots and report.html. The ground truth is checkpointed "
                                         "to OUT/ground_truth.ckpt.safetensors and resumes when interrupted; "
                                         "results already in OUT are reused unless --recompute.")
    _model_args(compare)
    _task_args(compare)
    compare.add_argument("--methods", default=COMPARE_DEFAULT, help=f"comma list of method ids (default {COMPARE_DEFAULT})")
    compare.add_argument("--nodes", default="attention", help="node types: all, attention, qkv, or a comma list (default attention)")
    compare.add_argument("--option", action="append", default=[], metavar="[METHOD:]KEY=VALUE",
                         help="a method option, repeatable; METHOD: limits it to one method, e.g. --option blocks:block_size=8")
    compare.add_argument("--setting", choices=["per_pair", "distribution", "both"], default="both",
                         help="rank nodes per single prompt pair (geometric mean over pairs), over the distribution "
                              "of pairs, or both (default both)")
    compare.add_argument("--k-max", type=int, default=None, metavar="K",
                         help="largest K on the curves (default min(1000, nodes with non-zero effect))")
    compare.add_argument("--recompute", action="store_true", help="ignore results saved in --out and compute again")
    _output_args(compare, "out/compare")

    verify = sub.add_parser("verify", help="verify an estimate's top nodes by exact activation patching",
                            description="Patch the nodes of a saved estimate in its ranking order, exactly, and save "
                                        "the exact effects (verified.json + verified.safetensors) for 'atpstar bound'.")
    _model_args(verify)
    _task_args(verify)
    verify.add_argument("--estimate", required=True, metavar="PATH",
                        help="saved estimate without extension, e.g. out/run/estimate (from 'atpstar run')")
    verify.add_argument("--budget", type=int, default=50, metavar="N", help="nodes to verify (default 50)")
    verify.add_argument("--threshold", type=float, default=None,
                        help="also stop once an estimate's |score| falls below this value")
    _output_args(verify, "out/verify")

    bound = sub.add_parser("bound", help="bound the effects of the nodes left unverified",
                           description="Run subsampling over the unverified nodes only and report an upper confidence "
                                       "bound on the largest remaining |effect| and a union bound on the probability "
                                       "that some remaining node has |effect| >= theta (assumes near-additive effects).")
    _model_args(bound)
    _task_args(bound)
    bound.add_argument("--verified", required=True, metavar="PATH",
                       help="saved verification without extension, e.g. out/verify/verified (from 'atpstar verify')")
    bound.add_argument("--theta", type=float, required=True, help="effect size the union bound is about")
    bound.add_argument("--samples", type=int, default=256, help="subsampling samples per pair (default 256)")
    bound.add_argument("--p", type=float, default=0.5, help="probability a node is in a sample (default 0.5)")
    bound.add_argument("--alpha", type=float, default=0.05, help="confidence level 1 - alpha (default 0.05)")
    bound.add_argument("--bound-seed", type=int, default=0, help="subsampling seed of the bound (default 0)")
    _output_args(bound, "out/bound")

    sub.add_parser("models", help="list the built-in models", description="List the built-in models (--model NAME).")
    sub.add_parser("methods", help="list the method ids", description="List the method ids with one-line descriptions.")
    return parser


def _model_args(parser: argparse.ArgumentParser, default_model: str | None = None) -> None:
    help_text = "built-in name (see 'atpstar models'), a local folder with config.json, or a Hugging Face hub id"
    if default_model:
        parser.add_argument("--model", default=default_model, help=f"{help_text} (default {default_model})")
    else:
        parser.add_argument("--model", required=True, help=help_text)
    parser.add_argument("--dtype", default="float32", help="dtype to compute in: float32 (default), float64, bfloat16")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--direction", choices=["noising", "denoising"], default="noising",
                        help="noising: patch noise activations into the clean run (the paper's, default); "
                             "denoising: patch clean activations into the noise run")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _task_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True,
                        help="ioi, cities, random (pairs of model samples, metric: log-prob of the clean next "
                             "token), or a .jsonl file with one {\"clean\", \"noise\", \"answer\", \"distractor\"} "
                             "object per line (distractor optional: metric logprob instead of logit difference)")
    parser.add_argument("--n-pairs", type=int, default=4, metavar="N", help="prompt pairs for ioi/cities/random (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt draw (default 0)")
    parser.add_argument("--seq-len", type=int, default=16, help="prompt length for --task random (default 16)")


def _output_args(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--out", default=default_out, help=f"output folder (default {default_out})")
    parser.add_argument("--top", type=int, default=20, help="rows of the printed table and report (default 20)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-plots", action="store_true", help="skip plots (no matplotlib needed)")


def parse_nodes(text: str) -> list[str]:
    """``all``, ``attention``, ``qkv`` or a comma list of node types."""
    from .nodes import check_node_types

    if text in NODE_GROUPS:
        return NODE_GROUPS[text]
    return check_node_types([t.strip() for t in text.split(",") if t.strip()])


def parse_options(items: Sequence[str], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``[METHOD:]KEY=VALUE`` strings -> method -> options; values parsed as JSON when they can be."""
    options: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for item in items:
        target, _, assignment = item.rpartition(":") if ":" in item.split("=", 1)[0] else ("", "", item)
        key, sep, raw = assignment.partition("=")
        if not sep or not key.strip():
            raise InputError(f"bad --option {item!r}; write KEY=VALUE or METHOD:KEY=VALUE, e.g. --option samples=128")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if target and target not in options:
            raise InputError(f"--option {item!r} names method {target!r}, which is not among {list(methods)}")
        for method in [target] if target else methods:
            options[method][key.strip()] = value
    return options


def load_task(model: Any, args: argparse.Namespace) -> tuple[Any, str]:
    """(PromptPairs, description) for --task."""
    from . import tasks

    task = args.task
    if task.endswith(".jsonl") or Path(task).is_file():
        from .jsonl import read_pairs_jsonl

        pairs = read_pairs_jsonl(task, model.tokenizer)
        return pairs, f"{task} ({pairs.n_pairs} pairs, metric {pairs.metric_name})"
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose one of {list(TASKS)} or give a .jsonl file of prompt pairs")
    if task == "random":
        pairs = tasks.random_pairs(model, args.n_pairs, args.seq_len, seed=args.seed)
    else:
        if model.tokenizer is None:
            raise InputError(f"task {task!r} needs the model's tokenizer, but the model has none")
        pairs = getattr(tasks, task)(model.tokenizer, args.n_pairs, seed=args.seed)
    return pairs, f"{task} ({pairs.n_pairs} pairs, seed {args.seed}, metric {pairs.metric_name})"


def say(message: str) -> None:
    """Progress messages go to stderr so stdout holds only the results."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# Commands --------------------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    from .zoo import BUILTIN_MODELS

    width = max(len(name) for name in BUILTIN_MODELS)
    for name, description in BUILTIN_MODELS.items():
        print(f"{name:<{width}}  {description}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import METHODS

    names = [m for m in DESCRIPTIONS if m in METHODS] + sorted(m for m in METHODS if m not in DESCRIPTIONS)
    width = max(len(name) for name in names)
    for name in names:
        doc = (METHODS[name].cls.__doc__ or "").strip().splitlines()
        print(f"{name:<{width}}  {DESCRIPTIONS.get(name) or (doc[0] if doc else '')}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import tasks

    start = time.monotonic()
    nodes = parse_nodes(args.nodes)
    out = _out_dir(args)
    model = _load_model(args)
    pairs = tasks.ioi(model.tokenizer, args.pairs, seed=args.seed)
    task = f"ioi ({pairs.n_pairs} pairs, seed {args.seed}, metric {pairs.metric_name})"
    estimate = _attribute(model, pairs, "atp*", nodes, {}, args)
    verified = _verify(model, pairs, estimate, args.budget, None, args) if args.budget > 0 else None
    bound = None
    if verified is not None and args.bound_samples > 0:
        bound = _bound(model, pairs, verified, None, args.bound_samples, 0.5, 0.05, args.seed, args)
    _finish_run(args, out, model, pairs, task, estimate, verified, bound, start, title="atpstar demo")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .methods import build_method

    start = time.monotonic()
    nodes = parse_nodes(args.nodes)
    options = parse_options(args.option, [args.method])[args.method]
    build_method(args.method, **options)  # unknown ids and options fail before the model loads
    out = _out_dir(args)
    model = _load_model(args)
    pairs, task = load_task(model, args)
    estimate = _attribute(model, pairs, args.method, nodes, options, args)
    verified = _verify(model, pairs, estimate, args.verify, None, args) if args.verify > 0 else None
    _finish_run(args, out, model, pairs, task, estimate, verified, None, start, title=f"atpstar run: {args.method}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .result import Attribution

    start = time.monotonic()
    estimate = Attribution.load(args.estimate)
    out = _out_dir(args)
    model = _load_model(args)
    pairs, task = load_task(model, args)
    _check_same_pairs(estimate.info, pairs, f"estimate {args.estimate}")
    if estimate.direction != args.direction:
        raise InputError(f"estimate {args.estimate} is {estimate.direction}; pass --direction {estimate.direction}")
    verified = _verify(model, pairs, estimate, args.budget, args.threshold, args)
    _finish_run(args, out, model, pairs, task, estimate, verified, None, start, title="atpstar verify", save_estimate=False)
    return 0


def cmd_bound(args: argparse.Namespace) -> int:
    start = time.monotonic()
    verified = load_verified(args.verified)
    out = _out_dir(args)
    model = _load_model(args)
    pairs, task = load_task(model, args)
    _check_same_pairs(verified.info, pairs, f"verification {args.verified}")
    bound = _bound(model, pairs, verified, args.theta, args.samples, args.p, args.alpha, args.bound_seed, args)
    from .report import _public_fields

    facts = {k: v for k, v in _public_fields(bound).items()}
    (out / "bound.json").write_text(json.dumps({k: _plain(v) for k, v in facts.items()} |
                                               {"assumption": getattr(bound, "assumption", "")}, indent=2))
    for key, value in facts.items():
        print(f"{key}: {_plain(value)}")
    if getattr(bound, "assumption", ""):
        print(f"assumption: {bound.assumption}")
    from .report import write_report

    path = write_report(out / "report.html", [], title="atpstar bound", task=task, verified=verified, bound=bound,
                        facts={"model": model.model_id, "wall time": f"{time.monotonic() - start:.1f} s"})
    say(f"wrote {out / 'bound.json'} and {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    start = time.monotonic()
    out = _out_dir(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from .methods import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InputError(f"unknown method(s) {unknown}; choose from: {', '.join(METHODS)}")
    options = parse_options(args.option, methods)
    nodes = parse_nodes(args.nodes)
    from .methods import build_method

    for method in methods:
        build_method(method, **options[method])  # bad options fail before the model loads
    model = _load_model(args)
    pairs, task = load_task(model, args)
    truth = _cached_or_run(out / "ground_truth", model, pairs, "activation_patching", nodes,
                           {"checkpoint": str(out / "ground_truth.ckpt.safetensors")}, args)
    estimates = {m: _cached_or_run(out / "estimates" / _file_name(m), model, pairs, m, nodes, options[m], args)
                 for m in methods}
    settings = ["per_pair", "distribution"] if args.setting == "both" else [args.setting]
    evaluations, images = [], []
    for setting in settings:
        ev = evaluate(truth, estimates, setting=setting, node_types=nodes, k_max=args.k_max)
        evaluations.append(ev)
        ev.save(out / f"evaluation_{setting}.json")
        ev.to_csv(out / f"comparison_{setting}.csv")
        (out / f"comparison_{setting}.md").write_text(ev.to_markdown() + "\n")
        print(f"\n## cost of verified recall: {setting} ({', '.join(nodes)}, K max {ev.k_max})\n")
        print(ev.to_markdown())
        if not args.no_plots:
            from .plots import plot_cost_curves

            images.append((f"Cost of verified recall ({setting})", plot_cost_curves(ev, out / f"cost_curves_{setting}")[0]))
    if not args.no_plots:
        from .plots import plot_estimate_vs_truth, plot_heatmaps

        shown = [estimates[m] for m in ("atp", "atp*") if m in estimates] or list(estimates.values())[:2]
        images.append(("|estimate| against |exact effect| per pair; points far below the diagonal are false "
                       "negatives", plot_estimate_vs_truth(truth, shown, out / "estimate_vs_truth", node_types=nodes)[0]))
        images.append(("Exact contributions (ground truth)", plot_heatmaps(truth, out / "heatmaps_truth",
                                                                             node_types=nodes, tokens=_tokens(model, pairs))[0]))
    truth.to_csv(out / "top_nodes_truth.csv", k=min(1000, sum(truth.scores[t].numel() for t in nodes)))
    from .report import write_report

    facts = {f"wall time {name}": f"{a.info.get('wall_s', 0):.1f} s" for name, a in [("ground truth", truth), *estimates.items()]}
    facts["total wall time"] = f"{time.monotonic() - start:.1f} s"
    path = write_report(out / "report.html", [truth, *estimates.values()], title="atpstar compare", task=task,
                        facts=facts, evaluations=evaluations, images=images, top=args.top, prompts=_prompts(model, pairs))
    say(f"wrote {path}")
    return 0


# Helpers ---------------------------------------------------------------------------------------


def _out_dir(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create output folder {out}: {err.strerror}") from err
    return out


def _load_model(args: argparse.Namespace) -> Any:
    from .loading import load_model

    task = getattr(args, "task", None)  # a bad task name or missing file fails before the model loads
    if task is not None and not (task.endswith(".jsonl") or Path(task).is_file()) and task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose one of {list(TASKS)} or give a .jsonl file of prompt pairs")
    if task is not None and task.endswith(".jsonl") and not Path(task).is_file():
        raise InputError(f"prompt pair file {task} does not exist")
    say(f"loading model {args.model}")
    return load_model(args.model, dtype=args.dtype, device=args.device)


def _attribute(model: Any, pairs: Any, method: str, nodes: list[str], options: dict[str, Any],
               args: argparse.Namespace) -> Any:
    from .api import attribute

    say(f"{method} on {pairs.n_pairs} pairs x {pairs.seq_len} tokens, nodes {','.join(nodes)}")
    started = time.monotonic()
    result = attribute(model, pairs, method, nodes, direction=args.direction, progress=not args.no_progress, **options)
    result.info["wall_s"] = time.monotonic() - started
    result.info["pairs_fingerprint"] = pairs.fingerprint()
    say(f"{method}: {result.cost} in {result.info['wall_s']:.1f} s")
    return result


def _cached_or_run(base: Path, model: Any, pairs: Any, method: str, nodes: list[str], options: dict[str, Any],
                   args: argparse.Namespace) -> Any:
    """A result saved at ``base`` for the same pairs, direction, nodes and options, else a fresh one (saved)."""
    from .result import Attribution, _jsonable

    if not args.recompute and Path(str(base) + ".json").is_file():
        saved = Attribution.load(base)
        same_options = {k: v for k, v in saved.options.items() if k != "checkpoint"} == \
            {k: v for k, v in _jsonable({**saved.options, **options}).items() if k != "checkpoint"}
        if (saved.info.get("pairs_fingerprint") == pairs.fingerprint() and saved.direction == args.direction
                and set(nodes) <= set(saved.node_types) and same_options):
            say(f"reusing {base}.json ({method})")
            return saved
        say(f"{base}.json was computed for other pairs, direction, nodes or options: recomputing")
    result = _attribute(model, pairs, method, nodes, options, args)
    base.parent.mkdir(parents=True, exist_ok=True)
    result.save(base)
    return result


def _verify(model: Any, pairs: Any, estimate: Any, budget: int, threshold: float | None, args: argparse.Namespace) -> Any:
    from .verify import verify

    say(f"verifying up to {budget} nodes by exact patching")
    started = time.monotonic()
    result = verify(model, pairs, estimate, budget=budget, threshold=threshold, progress=not args.no_progress)
    save_verified(result, Path(args.out) / "verified", estimate, pairs, time.monotonic() - started)
    say(f"verified {len(result.nodes)} nodes: {result.cost} in {time.monotonic() - started:.1f} s")
    return load_verified(Path(args.out) / "verified")


def _bound(model: Any, pairs: Any, verified: Any, theta: float | None, samples: int, p: float, alpha: float, seed: int,
           args: argparse.Namespace) -> Any:
    from .bound import false_negative_bound

    say(f"bounding the unverified nodes with {samples} subsampling samples per pair")
    started = time.monotonic()
    result = false_negative_bound(model, pairs, list(verified.nodes), nodes=verified.node_types, theta=theta,
                                  samples=samples, p=p, alpha=alpha, seed=seed, direction=verified.direction,
                                  progress=not args.no_progress)
    say(f"bound: {result.cost} in {time.monotonic() - started:.1f} s")
    return result


class SavedVerification:
    """A verification read back from disk: ``nodes``, ``effects`` [n_verified, P], ``cost``, ``info``."""

    def __init__(self, nodes: list[tuple[str, tuple[int, ...]]], effects: Any, cost: Any, info: dict[str, Any]) -> None:
        self.nodes, self.effects, self.cost, self.info = nodes, effects, cost, info

    def __getattr__(self, name: str) -> Any:
        info = self.__dict__.get("info", {})
        if name in info:
            return info[name]
        raise AttributeError(name)


def save_verified(result: Any, base: Path, estimate: Any, pairs: Any, wall_s: float) -> None:
    """``base.json`` (nodes, names, cost, scalars) and ``base.safetensors`` (effects [n_verified, P])."""
    import torch
    from safetensors.torch import save_file

    from .nodes import node_name

    nodes = [(t, tuple(int(i) for i in index)) for t, index in result.nodes]
    extra = {k: _plain(v) for k, v in vars(result).items()
             if k not in ("nodes", "effects", "cost", "node_types") and not k.startswith("_")
             and not isinstance(v, torch.Tensor)}
    meta = {"nodes": [[t, list(i)] for t, i in nodes], "names": [node_name(t, i) for t, i in nodes],
            "node_types": list(getattr(result, "node_types", estimate.node_types)),
            "cost": result.cost.to_dict(), "estimate_method": estimate.method, "direction": estimate.direction,
            "metric": estimate.metric, "model_id": estimate.model_id, "pairs_fingerprint": pairs.fingerprint(),
            "n_pairs": pairs.n_pairs, "seq_len": pairs.seq_len, "wall_s": wall_s, "extra": extra}
    base.parent.mkdir(parents=True, exist_ok=True)
    effects = torch.as_tensor(result.effects).reshape(len(nodes), pairs.n_pairs).contiguous()
    save_file({"effects": effects}, str(base) + ".safetensors")
    Path(str(base) + ".json").write_text(json.dumps(meta, indent=1))


def load_verified(path: str | Path) -> SavedVerification:
    from safetensors.torch import load_file

    from .cost import Cost

    base = Path(path).with_suffix("") if Path(path).suffix in (".json", ".safetensors") else Path(path)
    meta_path, tensor_path = Path(str(base) + ".json"), Path(str(base) + ".safetensors")
    if not meta_path.is_file() or not tensor_path.is_file():
        raise InputError(f"no saved verification at {base}: need {meta_path.name} and {tensor_path.name} "
                         "(written by 'atpstar verify')")
    meta = json.loads(meta_path.read_text())
    nodes = [(t, tuple(i)) for t, i in meta["nodes"]]
    info = {k: v for k, v in meta.items() if k not in ("nodes", "cost")}
    return SavedVerification(nodes, load_file(str(tensor_path))["effects"], Cost.from_dict(meta["cost"]), info)


def _check_same_pairs(info: dict[str, Any], pairs: Any, what: str) -> None:
    saved = info.get("pairs_fingerprint")
    if saved is not None and saved != pairs.fingerprint():
        raise InputError(f"{what} was computed on other prompt pairs; pass the same --task, --n-pairs and --seed")


def _finish_run(args: argparse.Namespace, out: Path, model: Any, pairs: Any, task: str, estimate: Any, verified: Any,
                bound: Any, start: float, title: str, save_estimate: bool = True) -> None:
    """Save the estimate, CSV, plots and report; print the top-nodes table."""
    if save_estimate:
        estimate.save(out / "estimate")
        estimate.to_csv(out / "top_nodes.csv", k=min(1000, sum(s.numel() for s in estimate.scores.values())))
    images = []
    if not args.no_plots:
        from .plots import plot_heatmaps, plot_verified

        images.append((f"{estimate.method} contributions", plot_heatmaps(estimate, out / "heatmaps",
                                                                          tokens=_tokens(model, pairs))[0]))
        if verified is not None and len(verified.nodes):
            images.append(("Verified exact effects", plot_verified(verified.nodes, verified.effects, estimate,
                                                                   out / "verified", top=args.top)[0]))
    from .report import write_report

    facts = {f"wall time {estimate.method}": f"{estimate.info.get('wall_s', 0):.1f} s",
             "total wall time": f"{time.monotonic() - start:.1f} s"}
    path = write_report(out / "report.html", [estimate], title=title, task=task, facts=facts, verified=verified,
                        bound=bound, images=images, top=args.top, prompts=_prompts(model, pairs))
    print_top(estimate, verified, args.top)
    written = sorted(p.name for p in out.iterdir() if p.is_file())
    say(f"wrote {out}/ ({', '.join(written)}) in {time.monotonic() - start:.1f} s")


def print_top(estimate: Any, verified: Any, top: int) -> None:
    from .report import verified_lookup

    lookup = verified_lookup(verified) if verified is not None else {}
    rows = estimate.top(top)
    width = max([len(r.name) for r in rows] + [4])
    header = f"{'rank':>4}  {'node':<{width}}  {'type':<6}  {estimate.method + ' score':>14}"
    print(header + (f"  {'exact effect':>12}" if lookup else ""))
    for rank, row in enumerate(rows, start=1):
        line = f"{rank:>4}  {row.name:<{width}}  {row.node_type:<6}  {row.score:>14.4g}"
        if lookup:
            effect = lookup.get((row.node_type, row.index))
            line += f"  {'-' if effect is None else format(float(effect.mean()), '.4g'):>12}"
        print(line)


def _tokens(model: Any, pairs: Any) -> list[str] | None:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return None
    return [tokenizer.decode([int(i)]) for i in pairs.clean[0]]


def _prompts(model: Any, pairs: Any, count: int = 3) -> list[tuple[str, str]]:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return []
    return [(tokenizer.decode(pairs.clean[i].tolist()), tokenizer.decode(pairs.noise[i].tolist()))
            for i in range(min(count, pairs.n_pairs))]


def _file_name(method: str) -> str:
    return method.replace("*", "_star").replace("+", "_")


def _plain(value: Any) -> Any:
    try:
        import torch

        if isinstance(value, torch.Tensor):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


COMMANDS = {"demo": cmd_demo, "run": cmd_run, "compare": cmd_compare, "verify": cmd_verify, "bound": cmd_bound,
            "models": cmd_models, "methods": cmd_methods}


if __name__ == "__main__":
    sys.exit(main())
