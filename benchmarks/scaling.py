"""Scaling: wall time and working memory of atp, atp*, EAP, edge AtP* and exact patching relative to one
forward+backward, on several model shapes, in one or several source trees.

Random-weight models from configs shaped like SmolLM2-135M, Pythia-410M and Llama-3.2-1B (CPU and GPU) and
Llama-3.1-8B in bfloat16 (GPU only). For each model, on one batch of prompt pairs: one forward+backward
(gradient w.r.t. the embeddings, parameters frozen, as AtP takes it), then each call (``--calls``: atp and
atp* on all five node types, eap and edge atp* on edges, exact patching of the last layer's attention
nodes), each as a ratio to the forward+backward of the same tree in the same run. How the noise of a shared
machine is kept out (a worker process per tree and model, fixed threads, interleaved rounds, minima and
per-round ratios) and how working memory is measured (the kernel's peak RSS in a process where every tensor
is its own mapping; the CUDA allocator on a GPU): ``benchmarks/trees.py``. Next to the measured working
memory, the package's prediction (``MemoryPlan.working_gb``, what ``memory_gb`` bounds). A second table
times atp and atp* on the first model at growing numbers of pairs and prompt lengths (minimum of
``--growth-rounds`` interleaved rounds) and fits the exponent b of time ~ size^b.

Targets: atp and eap <= 1.6x, atp* and edge atp* <= 12x one forward+backward at every size; atp* working
memory (weights excluded) <= 1.5x that of one forward+backward; time linear in the number of pairs.

Usage:
    python benchmarks/scaling.py                                     # CPU: smollm2, pythia-410m, llama-1b
    python benchmarks/scaling.py --trees v0.2=/tmp/v020,now=. --no-growth
    python benchmarks/scaling.py --device cuda --models smollm2-135m,pythia-410m,llama-1b,llama-8b
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from trees import Timings, conditions, configs, memory_calls, parse_trees, time_calls, time_table


def slope(sizes: list[int], times: list[float]) -> float:
    """Least-squares exponent b of time = a · size^b."""
    xs, ys = [math.log(s) for s in sizes], [math.log(t) for t in times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def growth(args: argparse.Namespace, trees: Any, log: Any) -> list[str]:
    """Time of each growth call at growing pairs (fixed length) and lengths (fixed pairs): one worker per size."""
    pairs_grid = [int(x) for x in args.growth_pairs.split(",")]
    seq_grid = [int(x) for x in args.growth_seq.split(",")]
    calls = args.growth_calls.split(",")
    lines = [
        "",
        f"### Growth ({args.growth_model}; time ~ size^b, minimum of {args.growth_rounds} rounds per size)",
        "",
        "| tree | call | grows in | held fixed | sizes | min s | exponent b |",
        "|---|---|---|---|---|---|---:|",
    ]
    for axis, grid in (("pairs", pairs_grid), ("seq", seq_grid)):
        runs: dict[tuple[str, str], list[float]] = {}
        for size in grid:
            n_pairs, seq = (size, seq_grid[len(seq_grid) // 2]) if axis == "pairs" else (pairs_grid[0], size)
            spec = {"model": args.growth_model, "layers": args.layers, "vocab": args.vocab, "pairs": n_pairs, "seq": seq,
                    "calls": calls, "threads": args.threads, "device": args.device}  # fmt: skip
            t = time_calls(trees, spec, args.growth_rounds, log, args.clock)
            for tree in trees:
                for call in calls:
                    runs.setdefault((tree.label, call), []).append(min(t.runs(tree.label, call) or [math.nan]))
        fixed = f"{seq_grid[len(seq_grid) // 2]} tokens" if axis == "pairs" else f"{pairs_grid[0]} pairs"
        for (tree_label, call), times in runs.items():
            shown = ", ".join(f"{x:.2f}" for x in times)
            b = slope(grid, times) if all(x > 0 for x in times) else math.nan
            lines.append(
                f"| {tree_label} | {call} | {axis} | {fixed} | {', '.join(map(str, grid))} | {shown} | {b:.2f} |"
            )
    lines += ["", "Target: exponent ~1 in pairs (linear). Length adds attention's T² terms."]
    return lines


def predicted_column(predicted: dict[tuple[str, str], float]) -> list[str]:
    """The package's predictions, one line per (tree, call) that has one."""
    if not predicted:
        return []
    shown = "; ".join(f"{tree} {call} {gb:.3f} GB" for (tree, call), gb in predicted.items())
    return ["", f"Predicted working memory (MemoryPlan.working_gb, includes the dense results): {shown}."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", default=None, help="label=path,... source trees to compare (default: this one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default=None, help="comma-separated (default: CPU three, GPU four; none)")
    parser.add_argument("--layers", type=int, default=None, help="override every model's depth (say so in results)")
    parser.add_argument("--vocab", type=int, default=None, help="override the vocabulary size (say so in results)")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--calls", default="atp,atp*,eap,edge atp*,exact", help="measured besides fwd+bwd")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the minimum counts)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--threads", type=int, default=1, help="threads per worker (the machine may be shared)")
    parser.add_argument("--growth-model", default="smollm2-135m")
    parser.add_argument("--growth-calls", default="atp,atp*")
    parser.add_argument("--growth-pairs", default="2,4,8,16")
    parser.add_argument("--growth-seq", default="16,32,64")
    parser.add_argument("--growth-rounds", type=int, default=2)
    parser.add_argument("--no-growth", action="store_true")
    parser.add_argument("--no-memory", action="store_true", help="time only")
    parser.add_argument("--out", default=None, help="also write the tables to this file (after every model)")
    args = parser.parse_args()
    names = [] if args.models == "none" else args.models.split(",") if args.models else (
        ["smollm2-135m", "pythia-410m", "llama-1b"] + (["llama-8b"] if args.device == "cuda" else [])
    )  # fmt: skip
    unknown = sorted(set(names) - set(configs()))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {sorted(configs())}")
    if "llama-8b" in names and args.device != "cuda":
        parser.error("llama-8b (bfloat16) runs on a GPU only (--device cuda)")
    trees = parse_trees(args.trees)
    calls = ["fwd+bwd", *[c for c in args.calls.split(",") if c and c != "fwd+bwd"]]
    lines = [f"## Scaling ({args.device}, {args.pairs} pairs x {args.seq} tokens, random weights)", ""]
    last: Timings | None = None
    for name in names:
        spec = {"model": name, "layers": args.layers, "vocab": args.vocab, "pairs": args.pairs, "seq": args.seq, "calls": calls,
                "threads": args.threads, "device": args.device}  # fmt: skip
        predicted: dict[tuple[str, str], float] = {}
        memory = None if args.no_memory else memory_calls(trees, spec, sys.stderr, predicted)
        last = time_calls(trees, spec, args.rounds, sys.stderr, args.clock)
        depth = (f", {args.layers} layers" if args.layers else "") + (
            f", vocabulary {args.vocab}" if args.vocab else ""
        )
        lines += [f"### {name}{depth}: {args.rounds} interleaved rounds, {args.clock} clock; "
                  f"{conditions(last, args.threads)}", "", *time_table(name, last, memory),
                  *predicted_column(predicted), ""]  # fmt: skip
        if args.out:  # written after every model, so a run stopped at a time limit keeps what finished
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text("\n".join(lines) + "\n")
    if not args.no_growth:
        lines += growth(args, trees, sys.stderr)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
