"""Exact activation patching: engine throughput vs a naive loop (one full forward per node).

Model: a ~124M-parameter GPT-2-small-shaped model with random weights (from a config), one prompt
pair of 16 tokens, all query/key/value/head nodes (12 layers x 12 heads x 16 positions x 4 types).
The naive loop runs a full forward with full logits per node, on a random sample of nodes, and
its throughput is measured in the same run. Prints a markdown table.

Usage: python benchmarks/patching_throughput.py [--family gpt2|llama|gpt_neox] [--naive-nodes 150]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers as tf

import atpstar
from atpstar.nodes import NODE_TABLE
from atpstar.runner import Run

CONFIGS = {
    "gpt2": lambda: tf.GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257),
    "gpt_neox": lambda: tf.GPTNeoXConfig(num_hidden_layers=12, num_attention_heads=12, hidden_size=768,
                                         intermediate_size=3072, vocab_size=50304, rotary_pct=0.25),
    "llama": lambda: tf.LlamaConfig(num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                                    hidden_size=768, intermediate_size=2048, vocab_size=32000),
}


def naive_effect(model: atpstar.Model, pairs: atpstar.PromptPairs, source: Run, node_type: str,
                 index: tuple[int, int, int], base_metric: torch.Tensor) -> float:
    """One full forward of the clean prompt with one node replaced, full logits, then the metric."""
    layer, unit, pos = index
    site = NODE_TABLE[node_type].site

    def patch(at_layer: int, at_site: str, x: torch.Tensor, run: Run) -> torch.Tensor:
        if at_layer != layer or at_site != site:
            return x
        x = x.clone()
        x[0, unit, pos] = source.records[site][layer][0, unit, pos]
        return x

    with torch.inference_mode():
        logits = model.logits(pairs.clean[:1], Run(model.n_layers, patch=patch))
        return float(pairs.evaluate_metric(logits[:, -1], torch.tensor([0])) - base_metric)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="gpt2", choices=sorted(CONFIGS))
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--naive-nodes", type=int, default=150)
    args = parser.parse_args()
    torch.manual_seed(0)
    hf = tf.AutoModelForCausalLM.from_config(CONFIGS[args.family]()).eval()
    model = atpstar.load_model(hf)
    n_params = sum(p.numel() for p in hf.parameters()) / 1e6
    vocab = hf.config.vocab_size
    clean, noise = torch.randint(0, vocab, (1, args.seq)), torch.randint(0, vocab, (1, args.seq))
    pairs = atpstar.PromptPairs(clean, noise, answer=[1], distractor=[2])
    node_types = ["query", "key", "value", "head"]

    start = time.perf_counter()
    result = atpstar.attribute(model, pairs, method="activation_patching", nodes=node_types, progress=True)
    engine_s = time.perf_counter() - start
    n_nodes = sum(v[0].numel() for v in result.per_pair.values())

    source = Run(model.n_layers, record=[NODE_TABLE[t].site for t in node_types])
    with torch.inference_mode():
        model.logits(pairs.noise[:1], source)
        base_metric = pairs.evaluate_metric(model.logits(pairs.clean[:1])[:, -1], torch.tensor([0]))
    gen = torch.Generator().manual_seed(1)
    sample = []
    for _ in range(args.naive_nodes):
        node_type = node_types[int(torch.randint(len(node_types), (1,), generator=gen))]
        shape = result.per_pair[node_type].shape[1:]
        sample.append((node_type, tuple(int(torch.randint(s, (1,), generator=gen)) for s in shape)))
    start = time.perf_counter()
    max_err = 0.0
    for node_type, index in sample:
        value = naive_effect(model, pairs, source, node_type, index, base_metric)
        max_err = max(max_err, abs(value - float(result.per_pair[node_type][(0, *index)])))
    naive_s = time.perf_counter() - start

    engine_rate, naive_rate = n_nodes / engine_s, len(sample) / naive_s
    print(f"\nExact activation patching, {args.family} {n_params:.0f}M params (random weights), 1 pair x {args.seq} tokens, "
          f"{torch.get_num_threads()} threads, {torch.__version__}\n")
    print("| engine | nodes timed | wall s | nodes/s | speed-up |")
    print("|---|---:|---:|---:|---:|")
    print(f"| naive loop (1 full forward per node) | {len(sample)} | {naive_s:.1f} | {naive_rate:.1f} | 1.0x |")
    print(f"| atpstar activation_patching | {n_nodes} | {engine_s:.1f} | {engine_rate:.1f} | {engine_rate / naive_rate:.1f}x |")
    print(f"\nmax |engine - naive| over the sampled nodes: {max_err:.2e}; engine cost: {result.cost}")


if __name__ == "__main__":
    main()
