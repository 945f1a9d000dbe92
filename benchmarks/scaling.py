"""Scaling: wall time and peak memory of atp, atp* and exact patching relative to one forward+backward.

Random-weight models from configs shaped like SmolLM2-135M, Pythia-410M and Llama-3.2-1B (CPU and GPU)
and Llama-3.1-8B in bfloat16 (GPU only). For each model, in one process and on one batch of prompt
pairs: one forward+backward of the batch (gradient w.r.t. the embeddings, parameters frozen, as AtP
takes it), then ``atp`` and ``atp*`` on all five node types and exact patching of one layer's attention
nodes (query, key, value, head), each timed and divided by the forward+backward time of the same run.
Time: fwd+bwd and atp are timed ``--repeats`` times interleaved (the minimum counts: a shared machine
only ever slows a run down), the rest once. Working memory is measured above the memory held before the
call (CPU: peak RSS sampled every 2 ms, in a separate process where glibc returns every tensor of 64 KB
or more to the OS when freed, so timing is not slowed by that setting; GPU:
``torch.cuda.max_memory_allocated``) and compared with the package's own prediction
(``MemoryPlan.working_gb``). A second table times ``atp`` and ``atp*`` on the first model at growing
numbers of pairs and prompt lengths and fits the exponent b of time ~ size^b.

Targets: atp <= 1.6x and atp* <= 12x one forward+backward at every size; atp* working memory
<= 1.5x that of one forward+backward; time linear in the number of pairs (exponent ~1).

Usage:
    python benchmarks/scaling.py                         # CPU: smollm2, pythia-410m, llama-1b
    python benchmarks/scaling.py --device cuda --models smollm2,pythia-410m,llama-1b,llama-8b
    python benchmarks/scaling.py --out tables.md --pairs 4 --seq 32 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

NODES = ["neuron", "query", "key", "value", "head"]
ATTENTION = ["query", "key", "value", "head"]


def configs() -> dict[str, tuple[Any, torch.dtype]]:
    """Model name -> (transformers config, dtype), shaped like the public checkpoints (random weights)."""
    import transformers as tf

    return {
        "smollm2-135m": (
            tf.LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                           intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                           max_position_embeddings=8192),
            torch.float32,
        ),
        "pythia-410m": (
            tf.GPTNeoXConfig(num_hidden_layers=24, num_attention_heads=16, hidden_size=1024, intermediate_size=4096,
                             vocab_size=50304, use_parallel_residual=True, max_position_embeddings=2048,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "partial_rotary_factor": 0.25},
                             tie_word_embeddings=False),
            torch.float32,
        ),
        "llama-1b": (
            tf.LlamaConfig(num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, hidden_size=2048,
                           intermediate_size=8192, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                           max_position_embeddings=131072),
            torch.float32,
        ),
        "llama-8b": (
            tf.LlamaConfig(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096,
                           intermediate_size=14336, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                           max_position_embeddings=131072),
            torch.bfloat16,
        ),
    }  # fmt: skip


def build(name: str, device: str) -> Any:
    """A random-weight model built directly on ``device`` in its dtype (8B never touches host memory)."""
    import transformers as tf

    import atpstar

    config, dtype = configs()[name]
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = tf.AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    return atpstar.load_model(hf.eval())


def make_pairs(model: Any, n_pairs: int, seq: int) -> Any:
    import atpstar

    vocab = model.hf_model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, vocab, (n_pairs, seq), generator=gen)
    noise = torch.randint(0, vocab, (n_pairs, seq), generator=gen)
    return atpstar.PromptPairs(clean, noise, answer=torch.arange(n_pairs), distractor=torch.arange(n_pairs) + 100)


def forward_backward(model: Any, pairs: Any) -> None:
    """One forward and one backward of the batch w.r.t. the embeddings (parameters frozen, as AtP)."""
    from atpstar.runner import Run

    with torch.enable_grad():
        hidden = model.embed(pairs.clean).detach().requires_grad_(True)
        final = model.run_layers(hidden, Run(model.n_layers))
        index = torch.arange(pairs.n_pairs, device=final.device)
        metric = pairs.evaluate_metric(model.unembed(final[:, -1]), index)
        torch.autograd.grad(metric.sum(), hidden)


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS so RSS shows live memory (glibc keeps them otherwise)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Peak:
    """Peak memory above the level at entry: CUDA allocator peak, or RSS sampled by a thread on the CPU.

    On the CPU it is meant for a process with a fixed glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_``, see
    ``memory_child``): every tensor above it is its own mapping, returned to the OS when freed, so RSS follows
    the live tensors.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.gb = 0.0

    def __enter__(self) -> Peak:
        release_freed_memory()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            import psutil

            self._process = psutil.Process()
            self._start = self._process.memory_info().rss
            self._max = self._start
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc: Any) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._max, self._process.memory_info().rss)
        self.gb = (peak - self._start) / 2**30


def timed(device: str, run: Callable[[], Any], peak: bool = True) -> tuple[float, float, Any]:
    """(seconds, peak GB above entry or 0 without ``peak``, result) of one call."""
    gc.collect()
    with Peak(device) if peak else contextlib.nullcontext() as measured:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = run()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return seconds, measured.gb if measured is not None else 0.0, result


def method_calls(
    model: Any, pairs: Any, n_pairs: int, patch_layer: int, methods: list[str]
) -> list[tuple[str, Callable[[], Any], str]]:
    """(label, call, target) of fwd+bwd and the chosen ``methods`` (atp, atp*, exact) on one model and batch."""
    import atpstar

    layer = patch_layer % model.n_layers
    calls: list[tuple[str, Callable[[], Any], str]] = [
        ("fwd+bwd", lambda: forward_backward(model, pairs), ""),
        ("atp", lambda: atpstar.attribute(model, pairs, method="atp", nodes=NODES, batch_size=n_pairs), "<= 1.6x"),
        (
            "atp*",
            lambda: atpstar.attribute(model, pairs, method="atp*", nodes=NODES, batch_size=n_pairs),
            "<= 12x, working <= 1.5x",
        ),
        (
            f"exact, layer {layer} attention",
            lambda: atpstar.attribute(
                model, pairs, method="activation_patching", nodes=ATTENTION, layers=[layer], memory_gb=4.0
            ),
            "",
        ),
    ]
    return [call for call in calls if call[0] == "fwd+bwd" or call[0].split(",")[0] in methods]


def _warm_up(model: Any, pairs: Any) -> None:
    """Allocator, kernels and the weights' fingerprint (computed once per model) before anything is measured."""
    import atpstar

    forward_backward(model, pairs)
    atpstar.attribute(model, pairs, method="atp", nodes=NODES, batch_size=pairs.n_pairs)


def memory_rows(
    name: str, device: str, n_pairs: int, seq: int, patch_layer: int, methods: list[str], log: Any
) -> list[dict[str, Any]]:
    """Working memory (peak above the level before the call) of each call, once, and the package's prediction."""
    from atpstar.memory import GB, weights_bytes

    model = build(name, device)
    pairs = make_pairs(model, n_pairs, seq)
    rows = []
    calls = method_calls(model, pairs, n_pairs, patch_layer, methods)
    _warm_up(model, pairs)
    for label, run, _ in calls:
        _, peak_gb, result = timed(device, run)
        predicted = result.info.get("memory", {}).get("working_gb") if result is not None else None
        rows.append({"model": name, "method": label, "peak_gb": peak_gb, "weights_gb": weights_bytes(model) / GB,
                     "predicted_gb": predicted})  # fmt: skip
        print(f"  {name} {label}: working memory {peak_gb:.3f} GB", file=log, flush=True)
    return rows


def time_rows(
    name: str, device: str, n_pairs: int, seq: int, patch_layer: int, methods: list[str], repeats: int, log: Any
) -> list[dict[str, Any]]:
    """Wall time of each call: fwd+bwd and atp ``repeats`` times interleaved (the minimum counts), the rest once."""
    model = build(name, device)
    pairs = make_pairs(model, n_pairs, seq)
    calls = method_calls(model, pairs, n_pairs, patch_layer, methods)
    _warm_up(model, pairs)
    times: dict[str, list[float]] = {label: [] for label, _, _ in calls}
    for repeat in range(repeats):
        for label, run, _ in calls:
            if repeat == 0 or label in ("fwd+bwd", "atp"):
                seconds, _, _ = timed(device, run, peak=False)
                times[label].append(seconds)
                print(f"  {name} {label}: {seconds:.2f} s", file=log, flush=True)
    base = min(times["fwd+bwd"])
    return [{"model": name, "method": label, "target": target, "seconds": min(times[label]),
             "x_time": min(times[label]) / base, "runs": len(times[label])} for label, _, target in calls]  # fmt: skip


def growth_rows(
    name: str, device: str, methods: list[str], pairs_grid: list[int], seq_grid: list[int], log: Any
) -> list[dict[str, Any]]:
    """Time of each method at growing pairs (fixed length) and lengths (fixed pairs), one batch each."""
    import atpstar

    model = build(name, device)
    atpstar.attribute(model, make_pairs(model, 1, seq_grid[0]), method="atp", nodes=NODES, batch_size=1)
    rows = []
    for method in methods:
        for axis, grid in (("pairs", pairs_grid), ("seq", seq_grid)):
            times = []
            for size in grid:
                n_pairs, seq = (size, seq_grid[len(seq_grid) // 2]) if axis == "pairs" else (pairs_grid[0], size)
                pairs = make_pairs(model, n_pairs, seq)
                seconds, _, _ = timed(
                    device,
                    lambda: atpstar.attribute(model, pairs, method=method, nodes=NODES, batch_size=n_pairs),
                    peak=False,
                )
                times.append(seconds)
                print(f"  growth {method} {axis}={size}: {seconds:.2f} s", file=log, flush=True)
            fixed = f"{seq_grid[len(seq_grid) // 2]} tokens" if axis == "pairs" else f"{pairs_grid[0]} pairs"
            rows.append({"method": method, "axis": axis, "fixed": fixed, "grid": grid, "times": times,
                         "exponent": slope(grid, times)})  # fmt: skip
    return rows


def slope(sizes: list[int], times: list[float]) -> float:
    """Least-squares exponent b of time = a · size^b."""
    xs, ys = [math.log(s) for s in sizes], [math.log(t) for t in times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def merge(times: list[dict[str, Any]], memory: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Time and memory rows of the same (model, method) side by side; ratios to that model's fwd+bwd."""
    by_key = {(row["model"], row["method"]): row for row in memory}
    rows = []
    for row in times:
        mem = by_key.get((row["model"], row["method"]), {})
        base = by_key.get((row["model"], "fwd+bwd"), {})
        merged = {**row, **mem}
        if mem and base:
            merged["x_work"] = mem["peak_gb"] / base["peak_gb"] if base["peak_gb"] > 0 else float("nan")
            merged["x_peak"] = (mem["weights_gb"] + mem["peak_gb"]) / (base["weights_gb"] + base["peak_gb"])
        rows.append(merged)
    return rows


def render(args: argparse.Namespace, rows: list[dict[str, Any]], growth: list[dict[str, Any]]) -> str:
    card = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} thread(s)"
    load = f"; load average at start {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    lines = [
        f"## Scaling ({card}, torch {torch.__version__}{load})",
        "",
        f"{args.pairs} pairs x {args.seq} tokens, random weights; atp/atp* on all five node types; exact patching of "
        "one layer's query/key/value/head nodes. x = ratio to one forward+backward of the same batch in the same "
        f"run. Time: the minimum of {args.repeats} interleaved runs for fwd+bwd and atp, one run for the others. "
        "Working memory: the peak above the level before the call (CPU: RSS of a separate process where every "
        "tensor of 64 KB or more is its own mapping; GPU: CUDA allocator), with the package's prediction "
        "(MemoryPlan.working_gb, what memory_gb bounds; it includes the dense results); peak: working + weights.",
        "",
        "| model | method | wall s | x fwd+bwd | working GB | x fwd+bwd | predicted working GB | peak GB | x fwd+bwd "
        "| target | met |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:
        has_mem = "peak_gb" in row and "x_work" in row
        met = ""
        if row["method"] == "atp":
            met = "yes" if row["x_time"] <= 1.6 else "NO"
        elif row["method"] == "atp*":
            met = "yes" if row["x_time"] <= 12 and (not has_mem or row["x_work"] <= 1.5) else "NO"
        predicted = "" if row.get("predicted_gb") is None else f"{row['predicted_gb']:.3f}"
        memory = (
            f"{row['peak_gb']:.3f} | {row['x_work']:.2f} | {predicted} | {row['weights_gb'] + row['peak_gb']:.3f} | "
            f"{row['x_peak']:.2f}"
            if has_mem
            else " | | | | "
        )
        lines.append(
            f"| {row['model']} | {row['method']} | {row['seconds']:.2f} | {row['x_time']:.2f} | {memory} | "
            f"{row['target']} | {met} |"
        )
    if growth:
        lines += ["", f"### Growth ({args.growth_model}; time ~ size^b, one batch per call, one run each)", "",
                  "| method | grows in | held fixed | sizes | wall s | exponent b |", "|---|---|---|---|---|---:|"]  # fmt: skip
        for row in growth:
            sizes = ", ".join(str(s) for s in row["grid"])
            times = ", ".join(f"{t:.2f}" for t in row["times"])
            lines.append(
                f"| {row['method']} | {row['axis']} | {row['fixed']} | {sizes} | {times} | {row['exponent']:.2f} |"
            )
        lines.append("")
        lines.append("Target: exponent ~1 in pairs (linear). Length adds attention's T² terms.")
    return "\n".join(lines) + "\n"


def memory_child(args: argparse.Namespace, names: list[str]) -> list[dict[str, Any]]:
    """Measure memory in a separate process whose allocator returns every tensor of 64 KB+ to the OS when freed
    (a fixed glibc mmap threshold), so RSS follows live tensors; timing stays in this process, unaffected."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "memory.json"
        command = [sys.executable, __file__, "--measure", "memory", "--json", str(out), "--models", ",".join(names),
                   "--pairs", str(args.pairs), "--seq", str(args.seq), "--patch-layer", str(args.patch_layer),
                   "--threads", str(args.threads), "--device", args.device, "--methods", args.methods]  # fmt: skip
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        done = subprocess.run(command, env=env, check=False)
        if not out.exists():
            print(f"memory measurement failed (exit {done.returncode}); tables without memory", file=sys.stderr)
            return []
        return list(json.loads(out.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=None, help="comma-separated names (default: CPU three, GPU four; none)")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--patch-layer", type=int, default=-1, help="layer whose attention nodes are patched")
    parser.add_argument("--methods", default="atp,atp*,exact", help="measured besides fwd+bwd")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timings of fwd+bwd and atp (minimum)")
    parser.add_argument("--growth-model", default="smollm2-135m")
    parser.add_argument("--growth-methods", default="atp,atp*")
    parser.add_argument("--growth-pairs", default="2,4,8,16")
    parser.add_argument("--growth-seq", default="16,32,64")
    parser.add_argument("--no-growth", action="store_true")
    parser.add_argument("--no-memory", action="store_true", help="time only")
    parser.add_argument("--measure", choices=["all", "memory"], default="all", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the machine may be shared)")
    parser.add_argument("--out", default=None, help="also write the tables to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [] if args.models == "none" else args.models.split(",") if args.models else (
        ["smollm2-135m", "pythia-410m", "llama-1b"] + (["llama-8b"] if args.device == "cuda" else [])
    )  # fmt: skip
    unknown = sorted(set(names) - set(configs()))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {sorted(configs())}")
    if "llama-8b" in names and args.device != "cuda":
        parser.error("llama-8b (bfloat16) runs on a GPU only (--device cuda)")
    methods = args.methods.split(",")
    if args.measure == "memory":  # the child process of ``memory_child``
        import json

        rows = []
        for name in names:
            rows += memory_rows(name, args.device, args.pairs, args.seq, args.patch_layer, methods, sys.stderr)
            gc.collect()
            Path(args.json).write_text(json.dumps(rows))  # after every model: a killed run keeps what finished
        return
    memory: list[dict[str, Any]] = []
    if names and not args.no_memory:
        if args.device == "cpu":
            memory = memory_child(args, names)
        else:
            for name in names:
                memory += memory_rows(name, args.device, args.pairs, args.seq, args.patch_layer, methods, sys.stderr)
                torch.cuda.empty_cache()
    times: list[dict[str, Any]] = []
    for name in names:
        times += time_rows(name, args.device, args.pairs, args.seq, args.patch_layer, methods, args.repeats, sys.stderr)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        if args.out:  # written after every model, so a run stopped at a time limit keeps what finished
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(render(args, merge(times, memory), []))
    growth = []
    if not args.no_growth:
        pairs_grid = [int(x) for x in args.growth_pairs.split(",")]
        seq_grid = [int(x) for x in args.growth_seq.split(",")]
        growing = args.growth_methods.split(",")
        growth = growth_rows(args.growth_model, args.device, growing, pairs_grid, seq_grid, sys.stderr)
    text = render(args, merge(times, memory), growth)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
