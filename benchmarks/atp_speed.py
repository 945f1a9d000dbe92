"""AtP variants: wall time and working memory relative to one forward+backward, in one or several source trees.

Model: a random-weight model shaped like SmolLM2-135M (Llama family: 30 layers, 9 query heads, 3 kv heads,
d_model 576, d_mlp 1536, vocab 49152) unless ``--model`` says otherwise; 8 prompt pairs of 16 tokens; all five
node types; edges for ``eap`` / ``edge atp*``. How noise is kept out of the ratios (one worker process per
tree importing that tree's ``atpstar``, fixed threads, interleaved rounds, minima, per-round ratios) and how
memory is measured (the kernel's peak RSS in a process where every tensor is its own mapping, or the CUDA
allocator): ``benchmarks/trees.py``.

Targets: atp and eap <= 1.6x, atp* and edge atp* <= 12x one forward+backward; atp* working memory (weights
excluded) <= 1.5x that of one forward+backward.

Usage (from the repository root):
    python benchmarks/atp_speed.py                                     # this tree, 5 rounds
    git worktree add --detach /tmp/v020 <0.2.0 commit>
    python benchmarks/atp_speed.py --trees v0.2=/tmp/v020,now=. --rounds 7 --memory
    python benchmarks/atp_speed.py --model pythia-410m --pairs 4 --seq 32 --calls fwd+bwd,atp,atp*
    python benchmarks/atp_speed.py --device cuda --model llama-1b --pairs 8 --seq 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trees import CALLS, conditions, configs, memory_calls, parse_trees, time_calls, time_table

DEFAULT_CALLS = "fwd+bwd,atp,atp+qkfix,atp+graddrop,atp*,eap,edge atp*"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", default=None, help="label=path,... source trees to compare (default: this one)")
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(configs()))
    parser.add_argument("--layers", type=int, default=None, help="override the model's depth (say so in results)")
    parser.add_argument("--vocab", type=int, default=None, help="override the vocabulary size (say so in results)")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--calls", default=DEFAULT_CALLS, help=f"fwd+bwd (always), exact, {', '.join(CALLS)}")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the minimum counts)")
    parser.add_argument("--threads", type=int, default=1, help="threads per worker (the same in every tree)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or the worker's CPU time (leaves out waiting for a core on a loaded machine)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory", action="store_true", help="also measure working memory (separate workers)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    calls = ["fwd+bwd", *[c for c in args.calls.split(",") if c and c != "fwd+bwd"]]
    unknown = [c for c in calls if c not in CALLS and c not in ("fwd+bwd", "exact")]
    if unknown:
        parser.error(f"unknown calls {unknown}; choose from fwd+bwd, exact, {', '.join(CALLS)}")
    trees = parse_trees(args.trees)
    spec = {"model": args.model, "layers": args.layers, "vocab": args.vocab, "pairs": args.pairs, "seq": args.seq, "calls": calls,
            "threads": args.threads, "device": args.device}  # fmt: skip
    memory = memory_calls(trees, spec, sys.stderr) if args.memory else None
    timings = time_calls(trees, spec, args.rounds, sys.stderr, args.clock)
    depth = (f", {args.layers} layers" if args.layers else "") + (f", vocabulary {args.vocab}" if args.vocab else "")
    lines = [
        f"## AtP variants on a {args.model}-shaped model{depth} (random weights), {args.pairs} pairs x {args.seq} "
        f"tokens, {args.device}",
        "",
        f"{args.rounds} interleaved rounds, {args.clock} clock; {conditions(timings, args.threads)}.",
        "",
        *time_table(args.model, timings, memory),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
