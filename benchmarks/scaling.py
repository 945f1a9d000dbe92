"""Scaling: wall time and peak memory of atp, atp* and exact patching relative to one forward+backward.

Random-weight models from configs shaped like SmolLM2-135M, Pythia-410M and Llama-3.2-1B (CPU and GPU)
and Llama-3.1-8B in bfloat16 (GPU only). For each model, in one process and on one batch of prompt
pairs: one forward+backward of the batch (gradient w.r.t. the embeddings, parameters frozen, as AtP
takes it), then ``atp`` and ``atp*`` on all five node types and exact patching of one layer's attention
nodes (query, key, value, head), each timed and divided by the forward+backward time of the same run.
Peak memory is measured above the memory held before the call (CPU: peak RSS sampled every 2 ms;
GPU: ``torch.cuda.max_memory_allocated``) and compared with the package's own prediction
(``MemoryPlan.working_gb``). A second table times ``atp`` and ``atp*`` on the first model at growing
numbers of pairs and prompt lengths and fits the exponent b of time ~ size^b.

Targets (issue #12): atp <= 1.6x and atp* <= 12x one forward+backward at every size; atp* peak memory
<= 1.5x that of one forward+backward; time linear in the number of pairs (exponent ~1).

Usage:
    python benchmarks/scaling.py                         # CPU: smollm2, pythia-410m, llama-1b
    python benchmarks/scaling.py --device cuda --models smollm2,pythia-410m,llama-1b,llama-8b
    python benchmarks/scaling.py --out tables.md --pairs 4 --seq 32 --threads 2
"""

from __future__ import annotations

import argparse
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

    On the CPU the script runs with a fixed glibc mmap threshold (see ``main``): every large tensor is
    its own mapping, returned to the OS when freed, so RSS follows the live tensors.
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


def timed(device: str, run: Callable[[], Any]) -> tuple[float, float, Any]:
    """(seconds, peak GB above entry, result) of one call."""
    with Peak(device) as peak:
        start = time.perf_counter()
        result = run()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return seconds, peak.gb, result


def method_rows(name: str, device: str, n_pairs: int, seq: int, patch_layer: int, log: Any) -> list[dict[str, Any]]:
    import atpstar
    from atpstar.memory import GB, weights_bytes

    model = build(name, device)
    weights_gb = weights_bytes(model) / GB
    pairs = make_pairs(model, n_pairs, seq)
    layer = patch_layer % model.n_layers
    forward_backward(model, pairs)  # warm-up (allocator, kernels)
    atpstar.attribute(model, pairs.subset([0]), method="atp", nodes=NODES, batch_size=1)
    calls: list[tuple[str, Callable[[], Any], str]] = [
        ("fwd+bwd", lambda: forward_backward(model, pairs), ""),
        ("atp", lambda: atpstar.attribute(model, pairs, method="atp", nodes=NODES, batch_size=n_pairs), "<= 1.6x"),
        (
            "atp*",
            lambda: atpstar.attribute(model, pairs, method="atp*", nodes=NODES, batch_size=n_pairs),
            "<= 12x, peak <= 1.5x",
        ),
        (
            f"exact, layer {layer} attention",
            lambda: atpstar.attribute(
                model, pairs, method="activation_patching", nodes=ATTENTION, layers=[layer], memory_gb=4.0
            ),
            "",
        ),
    ]
    rows = []
    for label, run, target in calls:
        seconds, peak_gb, result = timed(device, run)
        predicted = result.info.get("memory", {}).get("working_gb") if result is not None else None
        rows.append({"model": name, "method": label, "seconds": seconds, "peak_gb": peak_gb,
                     "total_gb": weights_gb + peak_gb, "predicted_gb": predicted, "target": target})  # fmt: skip
        print(f"  {name} {label}: {seconds:.2f} s, peak {peak_gb:.3f} GB", file=log, flush=True)
    base = rows[0]
    for row in rows:
        row["x_time"] = row["seconds"] / base["seconds"]
        row["x_peak"] = row["total_gb"] / base["total_gb"]
        row["x_work"] = row["peak_gb"] / base["peak_gb"] if base["peak_gb"] > 0 else float("nan")
    calls.clear()  # the model is released with this function's frame
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def growth_rows(name: str, device: str, pairs_grid: list[int], seq_grid: list[int], log: Any) -> list[dict[str, Any]]:
    """Time of atp and atp* at growing pairs (fixed length) and lengths (fixed pairs), one batch each."""
    import atpstar

    model = build(name, device)
    atpstar.attribute(model, make_pairs(model, 1, seq_grid[0]), method="atp", nodes=NODES, batch_size=1)
    rows = []
    for method in ("atp", "atp*"):
        for axis, grid in (("pairs", pairs_grid), ("seq", seq_grid)):
            times = []
            for size in grid:
                n_pairs, seq = (size, seq_grid[len(seq_grid) // 2]) if axis == "pairs" else (pairs_grid[0], size)
                pairs = make_pairs(model, n_pairs, seq)
                seconds, _, _ = timed(
                    device, lambda: atpstar.attribute(model, pairs, method=method, nodes=NODES, batch_size=n_pairs)
                )
                times.append(seconds)
                print(f"  growth {method} {axis}={size}: {seconds:.2f} s", file=log, flush=True)
            rows.append({"method": method, "axis": axis, "grid": grid, "times": times, "exponent": slope(grid, times)})
    return rows


def slope(sizes: list[int], times: list[float]) -> float:
    """Least-squares exponent b of time = a · size^b."""
    xs, ys = [math.log(s) for s in sizes], [math.log(t) for t in times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def render(args: argparse.Namespace, rows: list[dict[str, Any]], growth: list[dict[str, Any]]) -> str:
    card = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [
        f"## Scaling ({card}, torch {torch.__version__})",
        "",
        f"{args.pairs} pairs x {args.seq} tokens, random weights; atp/atp* on all five node types; exact patching of "
        "one layer's query/key/value/head nodes. x = ratio to one forward+backward of the same batch, same run. "
        "Peak: the model's weights plus the memory above the level before the call (CPU: RSS with every large "
        "tensor its own mapping; GPU: CUDA allocator); working: that memory above the weights; predicted: the "
        "package's MemoryPlan.working_gb for the call (what memory_gb bounds).",
        "",
        "| model | method | wall s | x fwd+bwd | peak GB | x fwd+bwd | working GB | x fwd+bwd | predicted working GB "
        "| target | met |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:
        met = ""
        if row["method"] == "atp":
            met = "yes" if row["x_time"] <= 1.6 else "NO"
        elif row["method"] == "atp*":
            met = "yes" if row["x_time"] <= 12 and row["x_peak"] <= 1.5 else "NO"
        predicted = "" if row["predicted_gb"] is None else f"{row['predicted_gb']:.3f}"
        lines.append(
            f"| {row['model']} | {row['method']} | {row['seconds']:.2f} | {row['x_time']:.2f} | {row['total_gb']:.3f} | "
            f"{row['x_peak']:.2f} | {row['peak_gb']:.3f} | {row['x_work']:.2f} | {predicted} | {row['target']} | {met} |"
        )
    if growth:
        lines += ["", f"### Growth ({args.growth_model}; time ~ size^b, one batch per call)", "",
                  "| method | grows in | sizes | wall s | exponent b |", "|---|---|---|---|---:|"]  # fmt: skip
        for row in growth:
            sizes = ", ".join(str(s) for s in row["grid"])
            times = ", ".join(f"{t:.2f}" for t in row["times"])
            lines.append(f"| {row['method']} | {row['axis']} | {sizes} | {times} | {row['exponent']:.2f} |")
        lines.append("")
        lines.append("Target: exponent ~1 in pairs (linear). Length adds attention's T² terms.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=None, help="comma-separated names (default: CPU three, GPU four; none)")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--patch-layer", type=int, default=-1, help="layer whose attention nodes are patched")
    parser.add_argument("--growth-model", default="smollm2-135m")
    parser.add_argument("--growth-pairs", default="2,4,8")
    parser.add_argument("--growth-seq", default="16,32,64")
    parser.add_argument("--no-growth", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the machine may be shared)")
    parser.add_argument("--out", default=None, help="also write the tables to this file")
    args = parser.parse_args()
    if args.device == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # A fixed threshold turns off glibc's adaptive one, which would keep freed tensors in the heap.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"})
    torch.set_num_threads(args.threads)
    names = [] if args.models == "none" else args.models.split(",") if args.models else (
        ["smollm2-135m", "pythia-410m", "llama-1b"] + (["llama-8b"] if args.device == "cuda" else [])
    )  # fmt: skip
    unknown = sorted(set(names) - set(configs()))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {sorted(configs())}")
    if "llama-8b" in names and args.device != "cuda":
        parser.error("llama-8b (bfloat16) runs on a GPU only (--device cuda)")
    rows: list[dict[str, Any]] = []
    for name in names:
        rows += method_rows(name, args.device, args.pairs, args.seq, args.patch_layer, sys.stderr)
        if args.out:  # written after every model, so a run stopped at a time limit keeps what finished
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(render(args, rows, []))
    growth = []
    if not args.no_growth:
        pairs_grid = [int(x) for x in args.growth_pairs.split(",")]
        seq_grid = [int(x) for x in args.growth_seq.split(",")]
        growth = growth_rows(args.growth_model, args.device, pairs_grid, seq_grid, sys.stderr)
    text = render(args, rows, growth)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
