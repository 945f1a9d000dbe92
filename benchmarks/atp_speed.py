"""AtP variants: wall time relative to one forward+backward of the same batch, and peak memory.

Model: SmolLM2-135M's shape (Llama family: 30 layers, 9 query heads, 3 kv heads, d_model 576,
d_mlp 1536, vocab 49152) with random weights, 8 prompt pairs of 16 tokens, all five node types.
Each method runs in its own subprocess so its peak memory (max RSS, or CUDA peak on a GPU) is
its own. Targets (issue): atp <= 1.6x, atp* <= 12x, atp* peak within 4 GB.

Usage: python benchmarks/atp_speed.py [--pairs 8] [--seq 16] [--device cpu|cuda] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

METHODS = ["atp", "atp+qkfix", "atp+graddrop", "atp*"]
NODES = ["neuron", "query", "key", "value", "head"]


def build(device: str):  # type: ignore[no-untyped-def]
    import transformers as tf

    import atpstar

    torch.manual_seed(0)
    config = tf.LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                            intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)
    hf = tf.AutoModelForCausalLM.from_config(config).eval().to(device)
    return atpstar.load_model(hf)


def forward_backward(model, pairs) -> None:  # type: ignore[no-untyped-def]
    """One forward and one backward of the batch w.r.t. the embeddings (parameters frozen, as AtP)."""
    from atpstar.runner import Run

    with torch.enable_grad():
        hidden = model.embed(pairs.clean).detach().requires_grad_(True)
        final = model.run_layers(hidden, Run(model.n_layers))
        metric = pairs.evaluate_metric(model.unembed(final[:, -1]), torch.arange(pairs.n_pairs, device=final.device))
        torch.autograd.grad(metric.sum(), hidden)


def worker(method: str, n_pairs: int, seq: int, device: str, repeats: int) -> dict[str, float]:
    import atpstar

    model = build(device)
    vocab = model.hf_model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    pairs = atpstar.PromptPairs(torch.randint(0, vocab, (n_pairs, seq), generator=gen),
                                torch.randint(0, vocab, (n_pairs, seq), generator=gen),
                                answer=torch.arange(n_pairs), distractor=torch.arange(n_pairs) + 100)
    run = (lambda: forward_backward(model, pairs)) if method == "fwd+bwd" else (
        lambda: atpstar.attribute(model, pairs, method=method, nodes=NODES, batch_size=n_pairs))
    run()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": min(times), "peak_gb": peak / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.pairs, args.seq, args.device, args.repeats)))
        return
    rows = {}
    for method in ["fwd+bwd", *METHODS]:
        cmd = [sys.executable, __file__, "--worker", method, "--pairs", str(args.pairs), "--seq", str(args.seq),
               "--device", args.device, "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows[method] = json.loads(out)
        print(f"  {method}: {rows[method]}", file=sys.stderr)
    base = rows["fwd+bwd"]["seconds"]
    targets = {"atp": "<= 1.6x", "atp*": "<= 12x, <= 4 GB"}
    print(f"\nAtP variants on a SmolLM2-135M-shaped Llama (random weights), {args.pairs} pairs x {args.seq} tokens, "
          f"all five node types, device {args.device}, {torch.get_num_threads()} threads\n")
    print("| method | wall s | x (fwd+bwd) | peak memory GB | target |")
    print("|---|---:|---:|---:|---|")
    for method, row in rows.items():
        print(f"| {method} | {row['seconds']:.2f} | {row['seconds'] / base:.2f} | {row['peak_gb']:.2f} | {targets.get(method, '')} |")
    print("\npeak memory: max RSS of the process (CPU, includes the model) or CUDA peak allocated (GPU)")


if __name__ == "__main__":
    main()
