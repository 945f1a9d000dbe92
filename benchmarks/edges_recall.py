"""Cost of verified recall on edges: EAP, edge AtP with the QK fix, edge AtP* and EAP-IG against exact
edge patching (``atpstar.evaluate`` with ``nodes=["edge"]``), position-summed and position-resolved.

Every edge (and, position-resolved, every edge at every sender position) is patched exactly for the
ground truth, so this runs on small models only (toy-ioi: seconds).

    .venv/bin/python benchmarks/edges_recall.py --model toy-ioi --pairs 8
"""

from __future__ import annotations

import argparse
import time

import torch

import atpstar

METHODS = ("atp", "atp+qkfix", "atp*", "atp+ig")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-ioi")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = atpstar.load_model(args.model)
    pairs = atpstar.tasks.ioi(model.tokenizer, args.pairs, seed=args.seed)
    print(
        f"model {args.model}, IOI {pairs.n_pairs} pairs x {pairs.seq_len} tokens, seed {args.seed}, "
        f"EAP-IG {args.ig_steps} steps, torch {torch.__version__}, {args.threads} thread(s)"
    )
    for positions in (False, True):
        start = time.monotonic()
        truth = atpstar.attribute(model, pairs, method="activation_patching", nodes=["edge"], edge_positions=positions)
        wall = time.monotonic() - start
        estimates = {
            m: atpstar.attribute(
                model,
                pairs,
                method=m,
                nodes=["edge"],
                edge_positions=positions,
                **({"ig_steps": args.ig_steps} if m == "atp+ig" else {}),
            )
            for m in METHODS
        }
        print(
            f"\n### edge_positions={positions}: {truth.scores['edge'].numel()} edges; exact edge patching "
            f"{truth.cost.forward_equivalents:.0f} forward-equivalents, {wall:.1f} s"
        )
        for setting in ("distribution", "per_pair"):
            ev = atpstar.evaluate(truth, estimates, setting=setting)
            print(f"\n{setting} (K max {ev.k_max})\n\n{ev.to_markdown()}")


if __name__ == "__main__":
    main()
