"""Edges benchmark: EAP, EAP-IG and edge AtP* on MIB's metrics (CPR, CMD) with their costs, and each
method's edges against exact edge patching.

For each model: edge scores by every method, the faithfulness curve of its top-|score| circuits at
MIB's edge fractions (CPR, CMD), cost in forward-pass equivalents and wall time, and agreement with
exact edge patching: on the toy model over every edge; on SmolLM2 (≈123k edges, too many to patch
all on a CPU) over a pool made of every method's top edges and random edges, all patched exactly.

    .venv/bin/python benchmarks/edges.py --model toy-ioi --pairs 8
    .venv/bin/python benchmarks/edges.py --model smollm2-135m --pairs 4 --pool 60
"""

from __future__ import annotations

import argparse
import time

import torch

import atpstar
from atpstar.cost import Cost
from atpstar.edges.circuits import faithfulness_curve
from atpstar.edges.graph import graph_of
from atpstar.edges.patching import patch_edges, prepare_edges


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def exact_on(model, pairs, edges: torch.Tensor) -> torch.Tensor:
    """Mean exact effect [len(edges)] over pairs, patching each edge alone."""
    graph = graph_of(model)
    cache = prepare_edges(model, graph, pairs, "noising", Cost())
    layer_of = torch.tensor([graph.receiver_layer(r) for r in graph.receiver_index[edges].tolist()])
    out = torch.zeros(pairs.n_pairs, len(edges), dtype=torch.float64)
    for layer in layer_of.unique().tolist():
        cols = torch.nonzero(layer_of == layer)[:, 0]
        for p in range(pairs.n_pairs):
            for start in range(0, len(cols), 64):
                c = cols[start : start + 64]
                out[p, c] = patch_edges(model, cache, layer, torch.full_like(c, p), edges[c], Cost()).double()
    return out.mean(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy-ioi")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="atp,atp+ig,atp*")
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--pool", type=int, default=0, help="top edges per method (+ as many random) patched exactly; 0: all")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = atpstar.load_model(args.model)
    pairs = atpstar.tasks.ioi(model.tokenizer, args.pairs, seed=args.seed)
    graph = graph_of(model)
    print(f"model {args.model}: {graph.n_edges} edges; IOI {pairs.n_pairs} pairs x {pairs.seq_len} tokens, seed {args.seed}",
          flush=True)
    methods = [m for m in args.methods.split(",") if m]
    results, walls = {}, {}
    if args.pool == 0:
        methods = ["activation_patching", *methods]
    curves = {}
    for method in methods:
        options = {"ig_steps": args.ig_steps} if method == "atp+ig" else {}
        start = time.monotonic()
        results[method] = atpstar.attribute(model, pairs, method=method, nodes=["edge"], **options)
        walls[method] = time.monotonic() - start
        start = time.monotonic()
        curves[method] = (faithfulness_curve(model, pairs, results[method]), time.monotonic() - start)
        c = curves[method][0]
        print(f"  {method}: CPR {c.cpr:.4f} CMD {c.cmd:.4f} cost {results[method].cost.forward_equivalents:.1f} "
              f"fwd-eq, {walls[method]:.1f} s (+{curves[method][1]:.1f} s curve); f = "
              + ", ".join(f"{f:.3f}" for f in c.faithfulness), flush=True)
    if args.pool == 0:
        pool = torch.arange(graph.n_edges)
        exact = results["activation_patching"].scores["edge"].double()
        exact_cost = results["activation_patching"].cost.forward_equivalents
    else:
        gen = torch.Generator().manual_seed(args.seed)
        picks = [results[m].order(["edge"], args.pool)[2] for m in methods]
        picks.append(torch.randperm(graph.n_edges, generator=gen)[: args.pool])
        pool = torch.unique(torch.cat(picks))
        start = time.monotonic()
        exact = exact_on(model, pairs, pool)
        exact_cost = None
        walls["exact pool"] = time.monotonic() - start
    k = max(1, min(20, len(pool) // 10))
    true_top = set(pool[exact.abs().argsort(descending=True)[:k]].tolist())
    rows = []
    for method in methods:
        result = results[method]
        curve, curve_wall = curves[method]
        scores = result.scores["edge"].double()
        est = scores[pool] if args.pool else scores
        top = set(pool[est.abs().argsort(descending=True)[:k]].tolist())
        rows.append((method, curve.cpr, curve.cmd, result.cost.forward_equivalents, walls[method],
                     spearman(est.abs(), exact.abs()), len(top & true_top) / k, curve_wall, curve))
    print(f"\nexact edge patching on {len(pool)} edges" + (f" (pool; {walls['exact pool']:.1f} s)" if args.pool else
          f" (all; {exact_cost:.0f} forward-equivalents, {walls['activation_patching']:.1f} s)"))
    print(f"m(M) = {rows[0][8].metric_full:.3f}, m(∅) = {rows[0][8].metric_empty:.3f} (mean logit difference)\n")
    print(f"| method | CPR ↑ | CMD ↓ | cost (fwd-eq) | wall s | Spearman |s| vs exact | top-{k} recall vs exact | curve wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for method, cpr, cmd, cost, wall, rho, recall, cwall, _ in rows:
        print(f"| {method} | {cpr:.4f} | {cmd:.4f} | {cost:.1f} | {wall:.1f} | {rho:.3f} | {recall:.2f} | {cwall:.1f} |")
    print("\nfaithfulness f at each edge fraction:")
    print("| method | " + " | ".join(f"{x:g}" for x in rows[0][8].fractions) + " |")
    print("|---|" + "---:|" * len(rows[0][8].fractions))
    for method, *_, curve in rows:
        print(f"| {method} | " + " | ".join(f"{f:.3f}" for f in curve.faithfulness) + " |")


if __name__ == "__main__":
    main()
