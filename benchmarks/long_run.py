"""Long prompts and many pairs in bounded memory: measured peak vs the package's prediction.

A random Llama-shaped model (small enough for a CPU), 256 pairs of 512 tokens, ``atp*`` on neurons and
attention nodes with ``keep="top"`` under ``memory_gb``: prints the plan (batch, predicted working
memory), the measured working memory (peak above the level before the call; CPU: RSS with every large
tensor its own mapping, GPU: CUDA allocator) and what dense per-pair results would have needed.

Usage: python benchmarks/long_run.py [--pairs 256] [--seq 512] [--memory-gb 1.0] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from scaling import Peak  # noqa: E402  (same measurement as the scaling tables)

NODES = ["neuron", "query", "key", "value", "head"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--memory-gb", type=float, default=1.0)
    parser.add_argument("--method", default="atp*")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.device == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    torch.set_num_threads(args.threads)
    import transformers as tf

    import atpstar
    from atpstar.memory import GB, layout_elems

    torch.manual_seed(0)
    config = tf.LlamaConfig(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, hidden_size=128,
                            intermediate_size=512, vocab_size=1024, max_position_embeddings=args.seq)  # fmt: skip
    with torch.device(args.device):
        model = atpstar.load_model(tf.AutoModelForCausalLM.from_config(config).eval())
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 1024, (args.pairs, args.seq), generator=gen)
    noise = torch.randint(0, 1024, (args.pairs, args.seq), generator=gen)
    pairs = atpstar.PromptPairs(
        clean, noise, answer=torch.arange(args.pairs) % 1024, distractor=(torch.arange(args.pairs) + 7) % 1024
    )
    options = {"memory_gb": args.memory_gb, "keep": "top", "top_k": 100}
    plan = atpstar.predict_memory(model, args.pairs, args.seq, method=args.method, nodes=NODES, **options)
    dense_gb = args.pairs * layout_elems(model, NODES, args.seq) * 4 / GB
    with Peak(args.device) as peak:
        start = time.perf_counter()
        result = atpstar.attribute(model, pairs, method=args.method, nodes=NODES, **options)
        seconds = time.perf_counter() - start
    print(f"{args.method}, {args.pairs} pairs x {args.seq} tokens, {args.device}, keep='top' (top_k=100), "
          f"memory_gb={args.memory_gb:g}")  # fmt: skip
    print(f"plan: {plan.describe()}")
    print(
        f"measured working memory: {peak.gb:.3f} GB (predicted {plan.working_gb:.3f} GB, budget {args.memory_gb:g} GB)"
    )
    print(f"dense per-pair results would need {dense_gb:.2f} GB; wall {seconds:.1f} s; cost {result.cost}")


if __name__ == "__main__":
    main()
