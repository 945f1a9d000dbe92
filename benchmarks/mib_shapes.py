"""MIB's four models as shapes: edge graphs, memory and time of EAP, EAP-IG and edge AtP* (random weights).

For GPT-2-small, Qwen2.5-0.5B, Gemma-2-2B and Llama-3.1-8B the configs are written out here (no hub):
real widths, heads, kv heads, head dims and MLP widths. The full graph (MIB's edge count, asserted),
the full parameter count (built on the meta device, no memory) and the per-pair size of the sender
and receiver tensors an edge method holds are computed for every layer. Time and peak memory are
measured on the first ``--layers`` layers with a small vocabulary (the edge graph does not depend on
the vocabulary), each method in its own process (max RSS), P pairs x T tokens, float32 on the CPU:
the full model does not fit this machine. Ratios are against one forward+backward of the same
truncated model; the full-depth time grows with the layers (and edge AtP*'s GradDrop with L^2).

    .venv/bin/python benchmarks/mib_shapes.py                  # GPT-2-small whole, the others on 2 layers
    .venv/bin/python benchmarks/mib_shapes.py --shapes gpt2 --layers 12
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

METHODS = ("fwd+bwd", "atp", "atp+ig", "atp*")  # EAP, EAP-IG (MIB's 5 steps), edge AtP*
MIB_EDGES = {"gpt2": 32491, "qwen2.5": 179749, "gemma2": 74218, "llama3": 1592881}


def config(shape: str, n_layers: int | None = None, vocab: int | None = None):  # type: ignore[no-untyped-def]
    """The model's config from its published sizes (``n_layers``/``vocab`` override them)."""
    from transformers import Gemma2Config, GPT2Config, LlamaConfig, Qwen2Config

    if shape == "gpt2":
        cfg = GPT2Config(n_embd=768, n_layer=12, n_head=12, n_inner=3072, vocab_size=50257, n_positions=1024)
        layers_key, vocab_key = "n_layer", "vocab_size"
    elif shape == "qwen2.5":
        cfg = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                          intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True)
        layers_key, vocab_key = "num_hidden_layers", "vocab_size"
    elif shape == "gemma2":
        cfg = Gemma2Config(hidden_size=2304, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                           head_dim=256, intermediate_size=9216, vocab_size=256000, query_pre_attn_scalar=256,
                           sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
        layers_key, vocab_key = "num_hidden_layers", "vocab_size"
    elif shape == "llama3":
        cfg = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                          intermediate_size=14336, vocab_size=128256, rope_theta=500000.0)
        layers_key, vocab_key = "num_hidden_layers", "vocab_size"
    else:
        raise SystemExit(f"unknown shape {shape}; choose one of {list(MIB_EDGES)}")
    if n_layers is not None:
        setattr(cfg, layers_key, n_layers)
        if hasattr(cfg, "layer_types") and cfg.layer_types is not None:
            cfg.layer_types = cfg.layer_types[:n_layers]
    if vocab is not None:
        setattr(cfg, vocab_key, vocab)
    return cfg


def graph_sizes(shape: str) -> dict[str, float]:
    """Full-depth graph and parameter count (meta device), and per-pair sender + receiver tensors."""
    from transformers import AutoModelForCausalLM

    from atpstar.edges.graph import EdgeGraph

    cfg = config(shape)
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    n_layers = cfg.num_hidden_layers
    graph = EdgeGraph(n_layers, cfg.num_attention_heads, False)
    assert graph.n_edges == MIB_EDGES[shape], (shape, graph.n_edges)  # MIB's count (its EDGE_COUNTS)
    return {"params": params, "layers": n_layers, "senders": graph.n_senders, "receivers": graph.n_receivers,
            "edges": graph.n_edges, "d_model": cfg.hidden_size}


def worker(shape: str, method: str, layers: int, vocab: int, n_pairs: int, seq: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    import atpstar

    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(config(shape, layers, vocab)).eval()
    model = atpstar.load_model(hf_model)
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(0, vocab, (n_pairs, seq), generator=gen)
    noise = clean.clone()
    noise[:, 1] = (clean[:, 1] + 1) % vocab
    pairs = atpstar.PromptPairs(clean=clean, noise=noise, answer=torch.zeros(n_pairs, dtype=torch.long),
                                distractor=torch.ones(n_pairs, dtype=torch.long))
    options = {"ig_steps": 5} if method == "atp+ig" else {}
    for p in hf_model.parameters():
        p.requires_grad_(False)
    fwd_eq, wall = 0.0, 0.0
    for _ in range(2):  # the second run is timed (the first pays one-off costs)
        started = time.perf_counter()
        if method == "fwd+bwd":
            embeds = hf_model.get_input_embeddings()(clean).requires_grad_(True)
            hf_model(inputs_embeds=embeds).logits[:, -1].sum().backward()
        else:
            result = atpstar.attribute(model, pairs, method, ["edge"], edge_convention="mib", **options)
            fwd_eq = result.cost.forward_equivalents / n_pairs
        wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"wall_s": wall, "peak_gb": peak / 1e9, "fwd_eq_per_pair": fwd_eq}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="gpt2,qwen2.5,gemma2,llama3")
    parser.add_argument("--layers", type=int, default=2, help="measured layers (at least 2: GradDrop drops one)")
    parser.add_argument("--gpt2-layers", type=int, default=12, help="measured layers of GPT-2-small (its full 12)")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.layers, args.vocab, args.pairs, args.seq)))
        return
    print("| shape | params (full) | layers | senders | receivers | edges (MIB) | sender+receiver tensors / pair (T tokens) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    shapes = args.shapes.split(",")
    for shape in shapes:
        g = graph_sizes(shape)
        per_pair = (g["senders"] + g["receivers"]) * args.seq * g["d_model"] * 4 / 1e9
        print(f"| {shape} | {g['params'] / 1e9:.2f} B | {g['layers']} | {g['senders']:,} | {g['receivers']:,} | "
              f"{g['edges']:,} | {per_pair:.2f} GB (T = {args.seq}, float32) |")
    print()
    print(f"Measured on the first layers, vocabulary {args.vocab}, {args.pairs} pairs x {args.seq} tokens, float32, CPU:")
    print()
    print("| shape | layers | edges (truncated) | method | wall s | x fwd+bwd | peak GB | fwd-eq / pair |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    from atpstar.edges.graph import EdgeGraph

    for shape in shapes:
        layers = args.gpt2_layers if shape == "gpt2" else args.layers
        heads = config(shape).num_attention_heads
        edges = EdgeGraph(layers, heads, False).n_edges
        base = None
        for method in METHODS:
            cmd = [sys.executable, __file__, "--worker", shape, method, "--layers", str(layers), "--vocab",
                   str(args.vocab), "--pairs", str(args.pairs), "--seq", str(args.seq)]
            out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            base = base or out["wall_s"]
            print(f"| {shape} | {layers} | {edges:,} | {method} | {out['wall_s']:.2f} | {out['wall_s'] / base:.1f} | "
                  f"{out['peak_gb']:.2f} | {out['fwd_eq_per_pair']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
