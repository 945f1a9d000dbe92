"""Wall time of exact activation patching on 1 and 2 Ray workers (one CPU thread each).

SmolLM2-135M, attention nodes (query, key, value, head) of every layer, a few IOI pairs. Each
setting is warmed up first (actors started, model loaded by name from the local cache, one layer
patched) so the table times the sweep, not Ray's start-up. The in-process run (one thread) is the
reference the distributed results must equal. The load average is printed with every row: the
machine is shared, so a ratio is only meaningful when the load stayed low.

Usage:
    python benchmarks/distributed.py [--pairs 2] [--nodes query,key,value,head] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import atpstar
from atpstar.nodes import node_shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="IOI prompt pairs (default 2)")
    parser.add_argument("--nodes", default="query,key,value,head", help="node types (default: attention nodes)")
    parser.add_argument("--layers", default=None, help="comma list of layers to patch (default: all 30)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per setting; the best is shown")
    parser.add_argument("--skip-in-process", action="store_true", help="do not time the in-process reference")
    args = parser.parse_args()

    import ray

    os.environ["ATPSTAR_WORKER_THREADS"] = "1"  # one torch thread per worker
    torch.set_num_threads(1)
    nodes = args.nodes.split(",")
    model = atpstar.load_model("smollm2-135m")
    pairs = atpstar.tasks.ioi(model.tokenizer, args.pairs, seed=0)
    layers = list(range(model.n_layers)) if args.layers is None else [int(x) for x in args.layers.split(",")]
    per_layer = sum(int(torch.Size(node_shape(t, model.sizes, pairs.seq_len)[1:]).numel()) for t in nodes)
    n_nodes = per_layer * len(layers)
    print(
        f"SmolLM2-135M, {pairs.n_pairs} IOI pairs x {pairs.seq_len} tokens, nodes {','.join(nodes)}: "
        f"layers {args.layers or 'all'}: {n_nodes * pairs.n_pairs} patched forwards; {os.cpu_count()} CPU cores; torch {torch.__version__}"
    )

    def run(workers: int | None, only: list[int] | None = None) -> tuple[float, atpstar.Attribution]:
        started = time.perf_counter()
        result = atpstar.attribute(
            model, pairs, "activation_patching", nodes=nodes, workers=workers, layers=only or layers
        )
        return time.perf_counter() - started, result

    rows = []
    reference = None
    if not args.skip_in_process:
        load = os.getloadavg()[0]
        seconds, reference = min((run(None) for _ in range(args.repeats)), key=lambda r: r[0])
        rows.append(("in-process, 1 thread", seconds, None, load, os.getloadavg()[0], 0.0))

    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}
    )
    one_worker = None
    for workers in (1, 2):
        run(workers, only=list(range(model.n_layers - workers, model.n_layers)))  # warm-up: every actor loads the model
        load = os.getloadavg()[0]
        seconds, result = min((run(workers) for _ in range(args.repeats)), key=lambda r: r[0])
        error = 0.0
        if reference is not None:
            error = max(float((result.per_pair[t] - reference.per_pair[t]).abs().max()) for t in nodes)
        one_worker = seconds if workers == 1 else one_worker
        rows.append((f"{workers} Ray worker(s), 1 thread each", seconds, one_worker, load, os.getloadavg()[0], error))
    ray.shutdown()

    print()
    print(
        "| setting | wall s | speed-up vs 1 worker | patched forwards / s | load avg before / after | max abs diff vs in-process |"
    )
    print("|---|---|---|---|---|---|")
    for name, seconds, base, load_before, load_after, error in rows:
        speedup = "" if base is None else f"{base / seconds:.2f}x"
        rate = n_nodes * pairs.n_pairs / seconds
        print(
            f"| {name} | {seconds:.1f} | {speedup} | {rate:.0f} | {load_before:.2f} / {load_after:.2f} | {error:.1e} |"
        )


if __name__ == "__main__":
    main()
