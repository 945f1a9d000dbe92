"""Peak memory over the process base of every verb on a large pair file, against ``memory_gb``.

Prints one row per (pairs, verb, memory_gb): the kernel's peak resident set during the call above the
resident set at its start (``PeakMemory`` of ``trees.py``: ``gc.collect``, ``malloc_trim``, then
``/proc/self/clear_refs`` and ``VmHWM``), its wall time, and whether the peak stayed within ``memory_gb``.
Each cell runs in a fresh process with the default glibc allocator (what a user runs), after the model,
the pairs and the verb's input (the estimate ``verify`` ranks, the verification ``bound`` bounds) are built,
so the base holds them and the call's result counts against the budget.

The pair file is written once from the built-in toy-ioi task (``atpstar.tasks.ioi``, decoded to text) as
JSON lines and read back with ``read_pairs_jsonl``, the way ``atpstar find --task file.jsonl`` reads it.

    PYTHONPATH=src python benchmarks/memory_pairs.py --pairs 1000,10000 --verbs find,verify,atp,atp*,bound \\
        --memory 0.5,1.0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from trees import GB, PeakMemory, _status_kb

VERBS = ("find", "verify", "atp", "atp*", "bound")
NODES = ["head"]  # the toy's attention heads: find's whole search fits a CPU benchmark
THETA = 1.0


def write_pairs(path: Path, n_pairs: int) -> None:
    """``n_pairs`` toy-ioi pairs as JSON lines (the task's token ids decoded back to text)."""
    import atpstar

    model = atpstar.load_model("toy-ioi")
    pairs = atpstar.tasks.ioi(model.tokenizer, n_pairs, seed=0)
    decode = model.tokenizer.decode
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for i in range(n_pairs):
            line = {
                "clean": decode(pairs.clean[i].tolist()),
                "noise": decode(pairs.noise[i].tolist()),
                "answer": decode([int(pairs.answer[i])]),
                "distractor": decode([int(pairs.distractor[i])]),
            }
            handle.write(json.dumps(line) + "\n")


def _inputs(verb: str, model: Any, pairs: Any) -> Any:
    """What the verb takes besides model and pairs, built before the measurement (it is in the base)."""
    import atpstar

    if verb not in ("verify", "bound"):
        return None
    estimate = atpstar.attribute(model, pairs, method="atp", nodes=NODES, memory_gb=1.0)
    if verb == "verify":
        return estimate
    return atpstar.verify(model, pairs, estimate, budget=2, memory_gb=1.0)


def _call(verb: str, model: Any, pairs: Any, given: Any, memory_gb: float) -> Any:
    import atpstar

    if verb == "find":
        return atpstar.find(model, pairs, THETA, nodes=NODES, memory_gb=memory_gb)
    if verb == "verify":
        return atpstar.verify(model, pairs, given, budget=40, memory_gb=memory_gb)
    if verb == "bound":
        return atpstar.false_negative_bound(model, pairs, given, theta=THETA, samples=16, memory_gb=memory_gb)
    return atpstar.attribute(model, pairs, method=verb, nodes=NODES, memory_gb=memory_gb)


def measure(verb: str, path: Path, memory_gb: float, max_wall: float) -> dict[str, Any]:
    """One cell, in this process: peak over base (GB) and wall time (s) of one call. A call still running after
    ``max_wall`` seconds is stopped there and its peak so far reported (``partial``)."""
    import torch

    import atpstar

    torch.set_num_threads(1)
    model = atpstar.load_model("toy-ioi")
    pairs = atpstar.read_pairs_jsonl(path, model.tokenizer)
    given = _inputs(verb, model, pairs)
    with PeakMemory("cpu") as peak:
        start = time.perf_counter()

        def stop() -> None:
            base = peak._start  # the resident set at the start (``PeakMemory``)
            print(json.dumps({"peak_gb": (_status_kb("VmHWM") * 1024 - base) / GB, "wall_s": max_wall, "partial": True}))
            sys.stdout.flush()
            os._exit(0)

        timer = threading.Timer(max_wall, stop)
        timer.daemon = True
        timer.start()
        result = _call(verb, model, pairs, given, memory_gb)
        wall = time.perf_counter() - start
        timer.cancel()
    del result
    return {"peak_gb": peak.gb, "wall_s": wall}


def _cell(verb: str, path: Path, memory_gb: float, max_wall: float) -> dict[str, Any]:
    """``measure`` in a fresh process (nothing of an earlier cell stays resident)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    here = Path(__file__).resolve().parent
    args = [sys.executable, str(here / "memory_pairs.py"), "--cell", verb, str(path), str(memory_gb), str(max_wall)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="10000", help="comma-separated pair counts")
    parser.add_argument("--verbs", default=",".join(VERBS), help=f"comma-separated, of {list(VERBS)}")
    parser.add_argument("--memory", default="1.0", help="comma-separated memory_gb values")
    parser.add_argument("--cache", default="out/cache", help="folder for the generated pair files")
    parser.add_argument("--max-wall", type=float, default=600.0, help="stop a call after this many seconds")
    parser.add_argument("--cell", nargs=4, metavar=("VERB", "FILE", "MEMORY_GB", "MAX_WALL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        verb, path, memory_gb, max_wall = args.cell
        print(json.dumps(measure(verb, Path(path), float(memory_gb), float(max_wall))))
        return
    print(f"{'pairs':>6} {'verb':<7} {'memory_gb':>9} {'peak over base GB':>17} {'wall s':>7}  within memory_gb")
    for n_pairs in (int(n) for n in args.pairs.split(",")):
        path = Path(args.cache) / f"toy-ioi-{n_pairs}.jsonl"
        if not path.is_file():
            write_pairs(path, n_pairs)
        for verb in args.verbs.split(","):
            for memory_gb in (float(m) for m in args.memory.split(",")):
                row = _cell(verb, path, memory_gb, args.max_wall)
                if "error" in row:
                    print(f"{n_pairs:>6} {verb:<7} {memory_gb:>9g}  error: {row['error']}", flush=True)
                    continue
                within = ("yes" if row["peak_gb"] <= memory_gb else "NO") + (" (stopped)" if row.get("partial") else "")
                print(
                    f"{n_pairs:>6} {verb:<7} {memory_gb:>9g} {row['peak_gb']:>17.3f} {row['wall_s']:>7.1f}  {within}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
