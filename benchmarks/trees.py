"""Timing and memory of atpstar calls, compared across source trees in one run (used by atp_speed.py, scaling.py).

A shared 2-core machine moves single timings by 30 % and more. What this module does against that:

- **One worker process per source tree** (``--trees now=.,v020=/tmp/v020``): the tree's ``src`` goes first on
  ``PYTHONPATH``, so each worker imports that tree's ``atpstar``; the worker builds the model and pairs once,
  runs every call once to warm up, then times one call per request. Threads are fixed in the worker
  (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and ``torch.set_num_threads``), the same for every tree.
- **Interleaved rounds in lockstep**: round r times every call in every tree, one at a time (the other
  workers wait on their pipe, idle), with the order of calls and trees rotated each round. The minimum over
  rounds counts (load only ever slows a run down); the median and the max show the spread.
- **Ratios inside a round**: call / fwd+bwd of the same tree, and tree / first tree for the same call, are
  formed from measurements seconds apart; their median over rounds (with min..max) is given next to the
  ratio of minima. When both agree the machine's load did not decide the ratio.
- **Memory in separate workers** (one per tree), started with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc serves
  every allocation of 64 KB or more with its own mapping and returns it to the OS on free: RSS then follows
  the live tensors (torch's CPU allocator does not cache). Before each call the worker frees what it can
  (``gc.collect``, ``malloc_trim``) and resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` ← 5);
  after it, the peak above the level at the start is ``VmHWM - VmRSS(start)`` from ``/proc/self/status``: the
  kernel's exact high-water mark, not a sample. Without ``clear_refs`` a thread samples RSS every 1 ms. On a
  GPU: ``torch.cuda.max_memory_allocated`` above ``memory_allocated`` at the start. Weights are excluded
  (they are allocated before the start); the call's result is included.

Only the public API of every release is used (``load_model``, ``PromptPairs``, ``attribute``,
``Model.embed/run_layers/unembed``, ``runner.Run``), so 0.1.0, 0.2.0 and the current tree all run. A call a
tree does not have (edges before 0.2) is reported as missing, not as an error.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NODES = ["neuron", "query", "key", "value", "head"]
ATTENTION = ["query", "key", "value", "head"]
GB = 2**30

# call label -> (method, node types) of ``atpstar.attribute``; fwd+bwd and "exact" are special.
CALLS: dict[str, tuple[str, list[str]]] = {
    "atp": ("atp", NODES),
    "atp+qkfix": ("atp+qkfix", NODES),
    "atp+graddrop": ("atp+graddrop", NODES),
    "atp*": ("atp*", NODES),
    "atp+ig": ("atp+ig", NODES),
    "eap": ("atp", ["edge"]),
    "edge atp*": ("atp*", ["edge"]),
    "eap-ig": ("atp+ig", ["edge"]),
}
TARGETS = {"atp": 1.6, "eap": 1.6, "atp*": 12.0, "edge atp*": 12.0}  # x one forward+backward (time)
MEMORY_TARGETS = {"atp*": 1.5, "edge atp*": 1.5}  # working memory x that of one forward+backward


def configs() -> dict[str, tuple[Any, str]]:
    """Model name -> (transformers config, dtype name), shaped like the public checkpoints (random weights)."""
    import transformers as tf

    return {
        "tiny-llama": (
            tf.LlamaConfig(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                           intermediate_size=128, vocab_size=512, tie_word_embeddings=True),
            "float32",
        ),
        "smollm2-135m": (
            tf.LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                           intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                           max_position_embeddings=8192),
            "float32",
        ),
        "pythia-410m": (
            tf.GPTNeoXConfig(num_hidden_layers=24, num_attention_heads=16, hidden_size=1024, intermediate_size=4096,
                             vocab_size=50304, use_parallel_residual=True, max_position_embeddings=2048,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "partial_rotary_factor": 0.25},
                             tie_word_embeddings=False),
            "float32",
        ),
        "llama-1b": (
            tf.LlamaConfig(num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, hidden_size=2048,
                           intermediate_size=8192, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                           max_position_embeddings=131072),
            "float32",
        ),
        "llama-8b": (
            tf.LlamaConfig(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096,
                           intermediate_size=14336, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                           max_position_embeddings=131072),
            "bfloat16",
        ),
    }  # fmt: skip


# Worker side ---------------------------------------------------------------------------------------------


def build(name: str, device: str, layers: int | None = None, vocab: int | None = None) -> Any:
    """A random-weight model built directly on ``device`` in its dtype (seed 0); ``layers`` and ``vocab`` override
    the depth and the vocabulary (the layers keep their shapes; only the last position is unembedded)."""
    import torch
    import transformers as tf

    import atpstar

    config, dtype_name = configs()[name]
    if layers:
        config.num_hidden_layers = layers
    if vocab:
        config.vocab_size = vocab
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype_name))
    try:
        with torch.device(device):
            hf = tf.AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    return atpstar.load_model(hf.eval())


def make_pairs(model: Any, n_pairs: int, seq: int) -> Any:
    import torch

    import atpstar

    vocab = model.hf_model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, vocab, (n_pairs, seq), generator=gen)
    noise = torch.randint(0, vocab, (n_pairs, seq), generator=gen)
    return atpstar.PromptPairs(clean, noise, answer=torch.arange(n_pairs), distractor=torch.arange(n_pairs) + 100)


def forward_backward(model: Any, pairs: Any) -> None:
    """One forward and one backward of the batch w.r.t. the embeddings (parameters frozen, as AtP takes it)."""
    import torch

    from atpstar.runner import Run

    with torch.enable_grad():
        hidden = model.embed(pairs.clean).detach().requires_grad_(True)
        final = model.run_layers(hidden, Run(model.n_layers))
        index = torch.arange(pairs.n_pairs, device=final.device)
        metric = pairs.evaluate_metric(model.unembed(final[:, -1]), index)
        torch.autograd.grad(metric.sum(), hidden)


def make_call(model: Any, pairs: Any, label: str) -> Callable[[], Any]:
    """The function a call label stands for (``CALLS``, ``fwd+bwd``, ``exact``: the last layer's attention nodes)."""
    import atpstar

    n = pairs.n_pairs
    if label == "fwd+bwd":
        return lambda: forward_backward(model, pairs)
    if label == "exact":
        layer = model.n_layers - 1
        return lambda: atpstar.attribute(model, pairs, method="activation_patching", nodes=ATTENTION, layers=[layer])
    method, nodes = CALLS[label]
    return lambda: atpstar.attribute(model, pairs, method=method, nodes=nodes, batch_size=n)


class PeakMemory:
    """Peak memory above the level at entry (module docstring): CUDA allocator, else the kernel's VmHWM."""

    def __init__(self, device: str) -> None:
        self.device, self.gb = device, 0.0

    def __enter__(self) -> PeakMemory:
        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        _malloc_trim()
        self._start = _status_kb("VmRSS") * 1024
        self._sampler = None
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        except OSError:
            self._sampler = _Sampler()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self._sampler is not None:
            peak = self._sampler.stop()
        else:
            peak = _status_kb("VmHWM") * 1024
        self.gb = (peak - self._start) / GB


class _Sampler:
    def __init__(self) -> None:
        self.peak, self._stop = _status_kb("VmRSS") * 1024, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kb("VmRSS") * 1024)
            time.sleep(0.001)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_kb("VmRSS") * 1024)


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


def _malloc_trim() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def serve(spec: dict[str, Any]) -> None:
    """Worker loop: build, warm up every call, then answer one JSON request per line on stdin."""
    import torch

    reply_to = sys.stdout
    sys.stdout = sys.stderr  # anything the package prints must not garble the replies
    torch.set_num_threads(spec["threads"])
    import atpstar

    device = spec["device"]
    model = build(spec["model"], device, spec.get("layers"), spec.get("vocab"))
    pairs = make_pairs(model, spec["pairs"], spec["seq"])
    calls: dict[str, Callable[[], Any] | None] = {}
    for label in spec["calls"]:
        call = make_call(model, pairs, label)
        try:
            call()  # warm-up: allocator, kernels, the weights' fingerprint (computed once per model)
            calls[label] = call
        except Exception as error:  # noqa: BLE001 - a release without this call: reported, not fatal
            calls[label] = None
            print(f"worker {spec['model']}: {label} unavailable: {type(error).__name__}: {error}", file=sys.stderr)
    version = getattr(atpstar, "__version__", "?")
    ready = {"ready": True, "atpstar": str(Path(atpstar.__file__).parent), "version": version,
             "threads": torch.get_num_threads(), "weights_gb": _weights_gb(model)}  # fmt: skip
    print(json.dumps(ready), file=reply_to, flush=True)
    for line in sys.stdin:
        label = json.loads(line)["call"]
        call = calls.get(label)
        if call is None:
            print(json.dumps({"missing": True}), file=reply_to, flush=True)
            continue
        print(json.dumps(_measure(call, device, spec["mode"])), file=reply_to, flush=True)


def _measure(call: Callable[[], Any], device: str, mode: str) -> dict[str, float]:
    import torch

    if mode == "memory":
        with PeakMemory(device) as peak:
            result = call()
            info = getattr(result, "info", None) or {}
            predicted = info.get("memory", {}).get("working_gb") if isinstance(info, dict) else None
            del result
        return {"gb": peak.gb, **({"predicted_gb": float(predicted)} if predicted is not None else {})}
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = call()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    del result
    return {"seconds": seconds, "cpu": cpu}


def _weights_gb(model: Any) -> float:
    return sum(p.numel() * p.element_size() for p in model.hf_model.parameters()) / GB


# Parent side ---------------------------------------------------------------------------------------------


@dataclass
class Tree:
    """A source tree to measure: ``label`` and the folder holding its ``src/atpstar``."""

    label: str
    root: Path


def parse_trees(text: str | None) -> list[Tree]:
    """``label=path,label=path`` (a bare path is labelled by its folder name); default: this script's tree."""
    here = Path(__file__).resolve().parents[1]
    if not text:
        return [Tree("this tree", here)]
    trees = []
    for item in text.split(","):
        label, _, path = item.rpartition("=")
        root = Path(path).expanduser().resolve()
        if not (root / "src" / "atpstar" / "__init__.py").is_file():
            raise SystemExit(f"--trees: {root} has no src/atpstar; give the root of a checkout (git worktree add ...)")
        trees.append(Tree(label or root.name, root))
    return trees


class Worker:
    """One tree's worker process for one model (timing or memory mode)."""

    def __init__(self, tree: Tree, spec: dict[str, Any], log: Any) -> None:
        threads = str(spec["threads"])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree.root / "src"), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
        if spec["mode"] == "memory":
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        self.tree = tree
        command = [sys.executable, str(Path(__file__).resolve()), "--serve", json.dumps(spec)]
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=log, text=True, bufsize=1)  # fmt: skip
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker for {self.tree.label} ({self.tree.root}) died; see its log above")
        return dict(json.loads(line))

    def ask(self, label: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"call": label}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(timeout=60)


@dataclass
class Timings:
    """Seconds per (tree, call), one entry per round (None where the tree lacks the call)."""

    trees: list[Tree]
    calls: list[str]
    seconds: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)

    def runs(self, tree: str, call: str) -> list[float]:
        return self.seconds.get((tree, call), [])


def time_calls(trees: list[Tree], spec: dict[str, Any], rounds: int, log: Any, clock: str = "wall") -> Timings:
    """Every call in every tree, ``rounds`` times, interleaved in lockstep with rotating order (module docstring).

    ``clock``: ``"wall"`` (elapsed time) or ``"cpu"`` (the worker's CPU time: on a loaded machine it leaves out
    the time spent waiting for a core, so it moves far less than wall time; on a quiet machine with one
    thread both agree).
    """
    spec = {**spec, "mode": "time"}
    workers = [Worker(tree, spec, log) for tree in trees]
    out = Timings(trees, list(spec["calls"]), info={w.tree.label: w.info for w in workers})
    try:
        for r in range(rounds):
            calls = spec["calls"][r % len(spec["calls"]) :] + spec["calls"][: r % len(spec["calls"])]
            for label in calls:
                for w in workers[r % len(workers) :] + workers[: r % len(workers)]:
                    reply = w.ask(label)
                    if "seconds" in reply:
                        out.seconds.setdefault((w.tree.label, label), []).append(
                            reply["cpu" if clock == "cpu" else "seconds"]
                        )
                        print(f"  {spec['model']} round {r + 1} {w.tree.label} {label}: {reply['seconds']:.3f} s "
                              f"(cpu {reply['cpu']:.3f} s)", file=log, flush=True)  # fmt: skip
    finally:
        for w in workers:
            w.close()
    return out


def memory_calls(
    trees: list[Tree], spec: dict[str, Any], log: Any, predicted: dict[tuple[str, str], float] | None = None
) -> dict[tuple[str, str], float]:
    """Working memory (GB above the level before the call) of every call in every tree, one worker at a time;
    the package's own prediction (``MemoryPlan.working_gb``) goes into ``predicted`` where a result has one."""
    spec = {**spec, "mode": "memory"}
    out = {}
    for tree in trees:
        worker = Worker(tree, spec, log)
        try:
            for label in spec["calls"]:
                reply = worker.ask(label)
                if "gb" in reply:
                    out[(tree.label, label)] = reply["gb"]
                    if predicted is not None and "predicted_gb" in reply:
                        predicted[(tree.label, label)] = reply["predicted_gb"]
                    print(f"  {spec['model']} {tree.label} {label}: working {reply['gb']:.3f} GB", file=log, flush=True)
        finally:
            worker.close()
    return out


# Statistics and tables -------------------------------------------------------------------------------------


def paired_ratios(a: list[float], b: list[float]) -> list[float]:
    """a[r] / b[r] for the rounds both have (measured within one round, seconds apart)."""
    return [x / y for x, y in zip(a, b)]


def describe(ratios: list[float]) -> str:
    """``median (min..max)`` of per-round ratios."""
    if not ratios:
        return ""
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}"
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}..{max(ratios):.2f})"


def spread(runs: list[float]) -> str:
    """How far the median and the slowest round lie above the fastest: ``+a% / +b%``."""
    if len(runs) < 2:
        return ""
    low = min(runs)
    return f"+{100 * (statistics.median(runs) / low - 1):.0f}% / +{100 * (max(runs) / low - 1):.0f}%"


def time_table(model: str, t: Timings, memory: dict[tuple[str, str], float] | None = None) -> list[str]:
    """Rows per (call, tree): min, median, spread, x fwd+bwd (of minima; per round), x first tree, targets."""
    first = t.trees[0].label
    mem_cols = " working GB | x fwd+bwd |" if memory else ""
    lines = [
        f"| model | call | tree | min s | median s | spread (median / max over min) | x fwd+bwd (min / min) "
        f"| x fwd+bwd per round, median (range) | x {first} (min / min) | x {first} per round |{mem_cols} target |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if memory else "") + "---|",
    ]
    for call in t.calls:
        for tree in t.trees:
            runs, base = t.runs(tree.label, call), t.runs(tree.label, "fwd+bwd")
            if not runs:
                lines.append(
                    f"| {model} | {call} | {tree.label} | n/a |  |  |  |  |  |  |" + (" | |" if memory else "") + " |"
                )
                continue
            x_min = min(runs) / min(base) if base else float("nan")
            ref = t.runs(first, call)
            vs_first = f"{min(runs) / min(ref):.3f}" if ref and tree.label != first else ""
            vs_first_rounds = describe(paired_ratios(runs, ref)) if ref and tree.label != first else ""
            target = TARGETS.get(call)
            goal = f"<= {target:g}x: {'met' if x_min <= target else 'NOT met'}" if target else ""
            mem = ""
            if memory:
                gb, base_gb = memory.get((tree.label, call)), memory.get((tree.label, "fwd+bwd"))
                if gb is None or not base_gb:
                    mem = " | |"
                else:
                    mem = f" {gb:.3f} | {gb / base_gb:.2f} |"
                    if call in MEMORY_TARGETS:
                        ok = gb / base_gb <= MEMORY_TARGETS[call]
                        goal += f"; memory <= {MEMORY_TARGETS[call]:g}x: {'met' if ok else 'NOT met'}"
            lines.append(
                f"| {model} | {call} | {tree.label} | {min(runs):.3f} | {statistics.median(runs):.3f} | {spread(runs)} "
                f"| {x_min:.2f} | {describe(paired_ratios(runs, base))} | {vs_first} | {vs_first_rounds} |{mem} {goal} |"
            )
    return lines


def conditions(t: Timings, threads: int) -> str:
    """One line on the load and the trees, for the table's caption."""
    load = os.getloadavg()
    trees = "; ".join(
        f"{label}: atpstar {info.get('version')} from {info.get('atpstar')}" for label, info in t.info.items()
    )
    return (f"load average (1/5/15 min) at the end {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} on {os.cpu_count()} "
            f"cores; {threads} thread(s) per worker; {trees}")  # fmt: skip


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--serve":
    serve(json.loads(sys.argv[2]))
