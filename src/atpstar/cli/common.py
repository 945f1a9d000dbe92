"""What several commands share: option parsing, loading the model and the prompt pairs, running a method,
verifying its top nodes and bounding the rest, with progress messages on stderr."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError

TASKS = ("ioi", "cities", "random")
NODE_GROUPS = {
    "all": ["neuron", "query", "key", "value", "head"],
    "attention": ["query", "key", "value", "head"],
    "qkv": ["query", "key", "value"],
}


def parse_nodes(text: str) -> list[str]:
    """``all``, ``attention``, ``qkv`` or a comma list of node types (and of those groups)."""
    from ..spaces import check_node_types

    if text in NODE_GROUPS:
        return NODE_GROUPS[text]
    items = [t.strip() for t in text.split(",") if t.strip()]
    return check_node_types([t for item in items for t in NODE_GROUPS.get(item, [item])])


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


# What this process saved that a rerun of the same command reuses (for a true interrupt message).
RESUMABLE: list[Path] = []


def check_methods(args: argparse.Namespace, methods: Sequence[str], nodes: list[str]) -> dict[str, dict[str, Any]]:
    """The ``--option`` values of each method, checked with the methods and node types before the model loads.

    Raises:
        InputError: an unknown method or option, a non-finite option value, a node type the method does
            not support, or (with ``--workers``) nodes or a method that do not run on workers.
    """
    from ..methods import build_method
    from .checks import check_option_values

    options = parse_options(args.option, methods)
    check_option_values(options)
    for method in methods:
        built = build_method(method, **options[method])
        built.check_supported(nodes, on_workers=bool(worker_options(args, method)))
    return options


def resumable(path: Path) -> Path:
    """Record ``path`` as a file a rerun resumes from or reuses; returns it."""
    RESUMABLE.append(Path(path))
    return Path(path)


def interrupt_note() -> str:
    """What an interrupted command kept: the checkpoints and results a rerun picks up, or nothing."""
    kept = [str(p) for p in dict.fromkeys(RESUMABLE) if p.exists()]
    if not kept:
        return "nothing was saved; rerunning starts from the beginning"
    return f"finished work is saved in {', '.join(kept)}; rerun the same command to resume"


def say(message: str) -> None:
    """Progress messages go to stderr so stdout holds only the results."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def out_dir(args: argparse.Namespace) -> Path:
    """The ``--out`` folder, created."""
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create output folder {out}: {err.strerror}") from err
    return out


def load_model(args: argparse.Namespace) -> Any:
    """The ``--model`` in ``--dtype`` on ``--device``, after checking ``--task`` (a cheap check first)."""
    from ..loading import load_model as load

    task = getattr(args, "task", None)  # a bad task name or missing file fails before the model loads
    if task is not None and task.startswith("mib:"):
        _mib_task(task)
    elif task is not None and not (task.endswith(".jsonl") or Path(task).is_file()) and task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose one of {list(TASKS)} or give a .jsonl file of prompt pairs")
    if task is not None and task.endswith(".jsonl") and not Path(task).is_file():
        raise InputError(f"prompt pair file {task} does not exist")
    say(f"loading model {args.model}")
    return load(args.model, dtype=args.dtype, device=args.device)


def load_task(model: Any, args: argparse.Namespace) -> tuple[Any, str]:
    """(PromptPairs, description) for --task."""
    from .. import tasks

    task = args.task
    if task.startswith("mib:"):
        name, split = _mib_task(task)
        mib = tasks.mib(
            name, split, tokenizer=model.tokenizer, counterfactual=args.counterfactual, path=args.mib_path, n=args.n_pairs
        )
        return mib, f"MIB {name} ({split}, {mib.n_pairs} pairs, {mib.info['counterfactual']}, metric {mib.metric_name})"
    if task.endswith(".jsonl") or Path(task).is_file():
        from ..jsonl import read_pairs_jsonl

        pairs = read_pairs_jsonl(task, model.tokenizer)
        return pairs, f"{task} ({pairs.n_pairs} pairs, metric {pairs.metric_name})"
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose one of {list(TASKS)} or give a .jsonl file of prompt pairs")
    check_activation_memory(model, args.n_pairs, args.seq_len if task == "random" else 8)
    if task == "random":
        from ..validate import check_length

        check_length(args.seq_len, max_positions(model), "--seq-len: prompts")
        pairs = tasks.random_pairs(model, args.n_pairs, args.seq_len, seed=args.seed)
    else:
        if model.tokenizer is None:
            raise InputError(f"task {task!r} needs the model's tokenizer, but the model has none")
        pairs = getattr(tasks, task)(model.tokenizer, args.n_pairs, seed=args.seed)
    return pairs, f"{task} ({pairs.n_pairs} pairs, seed {args.seed}, metric {pairs.metric_name})"


def _mib_task(task: str) -> tuple[str, str]:
    """(task, split) of ``mib:<task>[:<split>]``, checked before the model loads."""
    from ..tasks.mib import SPLITS
    from ..tasks.mib import TASKS as MIB_TASKS

    parts = task.split(":")
    name, split = parts[1].replace("-", "_") if len(parts) > 1 else "", parts[2] if len(parts) > 2 else "validation"
    if len(parts) > 3 or name not in MIB_TASKS or split not in SPLITS:
        raise InputError(f"bad MIB task {task!r}; write mib:<task>[:<split>], task one of {list(MIB_TASKS)}, split one of {list(SPLITS)}")
    return name, split


def max_positions(model: Any) -> int | None:
    """The model's position limit from its config, or None if it has none."""
    config = model.hf_model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_activation_memory(model: Any, n_pairs: int, seq_len: int) -> None:
    """Refuse a prompt set whose clean and noise activations alone cannot fit in this machine's memory."""
    from ..validate import check_memory

    s = model.sizes
    per_token = s.n_layers * (4 * s.n_heads * s.d_head + s.d_mlp + 2 * s.d_model)  # q, k, v, z, neurons, writes
    needed = 2 * n_pairs * seq_len * per_token * model.dtype.itemsize
    check_memory(needed, f"caching activations of {n_pairs} prompt pairs", "use fewer pairs (--n-pairs)", model.device)


def check_saved(saved_identity: dict[str, Any] | None, model: Any, pairs: Any, direction: str, what: str) -> None:
    """Refuse a saved estimate or verification made with another model, tokenizer, prompt pairs or metric."""
    from ..fingerprint import MODEL_FIELDS, check_identity, identity

    current = identity(model, pairs, direction)
    check_identity(
        saved_identity,
        current,
        what,
        "Pass the --model, --task, --n-pairs, --seed and --direction it was made with.",
        fields=(*MODEL_FIELDS, "pairs", "metric", "direction"),
    )


def run_method(
    model: Any, pairs: Any, method: str, nodes: list[str], options: dict[str, Any], args: argparse.Namespace
) -> Any:
    """``atpstar.attribute`` with the wall time and the pairs' fingerprint recorded in ``info``."""
    from ..api import attribute as run

    say(f"{method} on {pairs.n_pairs} pairs x {pairs.seq_len} tokens, nodes {','.join(nodes)}")
    started = time.monotonic()
    on_workers = worker_options(args, method)
    if on_workers.get("workers"):
        say(f"{method}: on {on_workers['workers']} Ray worker(s)")
    result = run(
        model, pairs, method, nodes, direction=args.direction, progress=not args.no_progress, **on_workers, **options
    )
    result.info["wall_s"] = time.monotonic() - started
    result.info["pairs_fingerprint"] = pairs.fingerprint()
    say(f"{method}: {result.cost} in {result.info['wall_s']:.1f} s")
    return result


def worker_options(args: argparse.Namespace, method: str | None = None) -> dict[str, Any]:
    """``workers``/``ray_address`` from ``--workers``/``--ray-address``, for ``method`` when it runs on
    workers (others run in-process; with ``run`` a method that cannot is refused by ``check_methods``)."""
    workers, address = getattr(args, "workers", None), getattr(args, "ray_address", None)
    if workers is None and address is None:
        return {}
    if method is not None and getattr(args, "command", None) == "compare":
        from ..methods import METHODS

        if method in METHODS and not METHODS[method].cls.distributable:
            return {}
    return {"workers": workers, "ray_address": address}


def cached_or_run(
    base: Path, model: Any, pairs: Any, method: str, nodes: list[str], options: dict[str, Any], args: argparse.Namespace
) -> Any:
    """The result saved at ``base`` if it was made by the same computation, else a fresh one (saved).

    A saved result of another computation (other weights, dtype, tokenizer, pairs, metric, direction,
    method options or version) is refused, naming what differs: ``--recompute`` discards it. A
    corrupt one is reported and recomputed.
    """
    from ..errors import CorruptFileError
    from ..fingerprint import RESULT_FIELDS, check_identity, identity
    from ..persist import bundle_exists, remove_bundle
    from ..result import Attribution

    if args.recompute and bundle_exists(base):
        say(f"--recompute: discarding {base}.json")
        remove_bundle(base)
    if bundle_exists(base):
        try:
            saved = Attribution.load(base)
        except CorruptFileError as err:
            say(f"warning: {err}; computing it again")
            remove_bundle(base)
        else:
            from ..methods import build_method

            full_options = build_method(method, **options).get_options()
            current = identity(model, pairs, args.direction, nodes, method, full_options)
            check_identity(
                saved.identity,
                current,
                f"saved result {base}.json ({method})",
                "Pass --recompute to discard it, or choose another --out.",
                fields=RESULT_FIELDS,
            )
            missing = [t for t in nodes if t not in saved.node_types]
            if not missing:
                say(f"reusing {base}.json ({method})")
                return saved
            say(f"{base}.json lacks node types {missing}: computing again")
    result = run_method(model, pairs, method, nodes, options, args)
    result.save(base)
    resumable(Path(str(base) + ".json"))
    return result


def verify_and_save(
    model: Any, pairs: Any, estimate: Any, budget: int, threshold: float | None, args: argparse.Namespace
) -> Any:
    """``atpstar.verify``, saved to ``OUT/verified`` with the pairs' fingerprint and the wall time in ``info``."""
    from ..verify import verify as run

    say(f"verifying up to {budget} nodes by exact patching")
    started = time.monotonic()
    result = run(
        model,
        pairs,
        estimate,
        budget=budget,
        threshold=threshold,
        progress=not args.no_progress,
        **worker_options(args),
    )
    result.info.update(
        pairs_fingerprint=pairs.fingerprint(),
        n_pairs=pairs.n_pairs,
        seq_len=pairs.seq_len,
        wall_s=time.monotonic() - started,
    )
    result.save(Path(args.out) / "verified")
    say(f"verified {len(result.nodes)} nodes: {result.cost} in {time.monotonic() - started:.1f} s")
    return result


def bound_unverified(
    model: Any,
    pairs: Any,
    verified: Any,
    theta: float | None,
    samples: int,
    p: float,
    alpha: float,
    seed: int,
    args: argparse.Namespace,
) -> Any:
    """``atpstar.false_negative_bound`` over the nodes ``verified`` left out."""
    from ..bound import false_negative_bound

    say(f"bounding the unverified nodes with {samples} subsampling samples per pair")
    started = time.monotonic()
    result = false_negative_bound(
        model,
        pairs,
        list(verified.nodes),
        nodes=verified.node_types,
        theta=theta,
        samples=samples,
        p=p,
        alpha=alpha,
        seed=seed,
        direction=verified.direction,
        progress=not args.no_progress,
        **worker_options(args),
    )
    say(f"bound: {result.cost} in {time.monotonic() - started:.1f} s")
    return result


def plain(value: Any) -> Any:
    """``value`` as JSON-ready data (``persist.to_jsonable``)."""
    from ..persist import to_jsonable

    return to_jsonable(value)
