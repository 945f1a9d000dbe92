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
    """``all``, ``attention``, ``qkv`` or a comma list of node types."""
    from ..nodes import check_node_types

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
    if task is not None and not (task.endswith(".jsonl") or Path(task).is_file()) and task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose one of {list(TASKS)} or give a .jsonl file of prompt pairs")
    if task is not None and task.endswith(".jsonl") and not Path(task).is_file():
        raise InputError(f"prompt pair file {task} does not exist")
    say(f"loading model {args.model}")
    return load(args.model, dtype=args.dtype, device=args.device)


def load_task(model: Any, args: argparse.Namespace) -> tuple[Any, str]:
    """(PromptPairs, description) for --task."""
    from .. import tasks

    task = args.task
    if task.endswith(".jsonl") or Path(task).is_file():
        from ..jsonl import read_pairs_jsonl

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


def check_same_pairs(info: dict[str, Any], pairs: Any, what: str) -> None:
    """Refuse a saved result whose ``info["pairs_fingerprint"]`` is not that of ``pairs``."""
    saved = info.get("pairs_fingerprint")
    if saved is not None and saved != pairs.fingerprint():
        raise InputError(f"{what} was computed on other prompt pairs; pass the same --task, --n-pairs and --seed")


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
    workers (others run in-process; with ``run`` a method that cannot is refused by ``attribute``)."""
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
    """A result saved at ``base`` for the same pairs, direction, nodes and options, else a fresh one (saved)."""
    from ..result import Attribution, _jsonable

    if not args.recompute and Path(str(base) + ".json").is_file():
        saved = Attribution.load(base)
        same_options = {k: v for k, v in saved.options.items() if k != "checkpoint"} == {
            k: v for k, v in _jsonable({**saved.options, **options}).items() if k != "checkpoint"
        }
        if (
            saved.info.get("pairs_fingerprint") == pairs.fingerprint()
            and saved.direction == args.direction
            and set(nodes) <= set(saved.node_types)
            and same_options
        ):
            say(f"reusing {base}.json ({method})")
            return saved
        say(f"{base}.json was computed for other pairs, direction, nodes or options: recomputing")
    result = run_method(model, pairs, method, nodes, options, args)
    base.parent.mkdir(parents=True, exist_ok=True)
    result.save(base)
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
    """``value`` as JSON-ready data: tensors as lists, unknown objects as their ``str``."""
    try:
        import torch

        if isinstance(value, torch.Tensor):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return str(value)
