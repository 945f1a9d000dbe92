"""Latent AtP against node AtP: wall time on Gemma-3-270M's shape with 16k-wide dictionaries on every layer.

Model: Gemma-3-270M's config (``~/.cache/atpstar/gemma-3-270m/config.json``, the built-in model's; else the
same sizes typed in: 18 layers, d_model 640, 4 heads, 1 kv-head, d_head 256, d_mlp 2048, vocab 262144) with
random weights. Dictionaries: JumpReLU SAEs of width 16384 (Gemma Scope 2's 16k) on ``blocks.{l}.hook_resid_post``
of every layer that has a run site after it (l = 0 .. 16; the last layer's resid_post is the final stream),
random weights with thresholds set so about ``--l0`` latents fire per token, as trained SAEs do.

Rows (seconds are the minimum over ``--repeats`` interleaved repeats, every row once per repeat):

- ``atp`` on the default node types vs ``atp`` on every latent and error node (target: ratio <= 1.3);
- ``atp*`` on each, as a ratio to its own ``atp`` (target: the latent ratio <= the node ratio);
- ``verify`` of the top ``--verify`` nodes of each estimate, per verified node (batching like node
  verification: the per-node time should be of the order of the node one).

Usage: python benchmarks/latent_speed.py [--pairs 4] [--seq 16] [--repeats 3] [--verify 32] [--width 16384]
       [--dense-products]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

CONFIG = Path.home() / ".cache" / "atpstar" / "gemma-3-270m" / "config.json"


def build_model() -> Any:
    import transformers as tf

    import atpstar

    torch.manual_seed(0)
    if CONFIG.exists():
        config = tf.Gemma3TextConfig.from_dict(json.loads(CONFIG.read_text()))
    else:
        config = tf.Gemma3TextConfig(num_hidden_layers=18, hidden_size=640, num_attention_heads=4, num_key_value_heads=1,
                                     head_dim=256, intermediate_size=2048, vocab_size=262144)  # fmt: skip
    hf = tf.AutoModelForCausalLM.from_config(config).eval()
    return atpstar.load_model(hf)


def build_dictionaries(model: Any, width: int, l0: int, pairs: Any) -> list[Any]:
    """Random JumpReLU SAEs on every resid_post with a run site; thresholds put ~l0 latents on per token."""
    from atpstar.dictionaries.dictionary import Dictionary
    from atpstar.runner import Run

    run = Run(model.n_layers, record={"resid_pre"})
    with torch.no_grad():
        model.run_layers(model.embed(pairs.clean), run)
    out = []
    gen = torch.Generator().manual_seed(0)
    for layer in range(model.n_layers - 1):
        x = run.get("resid_pre", layer + 1).reshape(-1, model.d_model)  # [P*T, D]
        w_enc = torch.randn(model.d_model, width, generator=gen) / x.norm(dim=-1).mean()
        pre = x @ w_enc  # [P*T, S]
        # [S]: ~l0 of S fire per token: each latent's pre-activation over tokens taken as normal (a quantile of
        # the few benchmark tokens would put the threshold at a sample maximum: L0 of several hundred)
        z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - l0 / width))
        threshold = (pre.mean(0) + z * pre.std(0)).clamp(min=1e-3)
        w_dec = torch.randn(width, model.d_model, generator=gen) / width**0.5
        out.append(Dictionary(name=f"res{layer}-16k", hook=f"blocks.{layer}.hook_resid_post", layer=layer,
                              W_enc=w_enc, W_dec=w_dec, b_enc=torch.zeros(width), b_dec=torch.zeros(model.d_model),
                              activation="jumprelu", threshold=threshold))  # fmt: skip
    return out


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main() -> None:
    import atpstar

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--verify", type=int, default=32)
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--l0", type=int, default=64)
    parser.add_argument(
        "--dense-products",
        action="store_true",
        help="products with Δf as dense matmuls (atpstar.dictionaries.sparse off), for comparison",
    )
    args = parser.parse_args()
    if args.dense_products:
        from atpstar.dictionaries import sparse

        sparse.DENSE_SHARE = -1.0
    model = build_model()
    vocab = model.hf_model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (2, args.pairs, args.seq), generator=gen)
    pairs = atpstar.PromptPairs(tokens[0], tokens[1], answer=torch.arange(args.pairs),
                                distractor=torch.arange(args.pairs) + 100)  # fmt: skip
    dicts = build_dictionaries(model, args.width, args.l0, pairs)
    latent_nodes = atpstar.api.with_dictionaries([], dicts)
    rows: dict[str, list[float]] = {}
    results: dict[str, Any] = {}
    runs = {
        "atp nodes": lambda: atpstar.attribute(model, pairs, "atp", batch_size=args.pairs),
        "atp latents": lambda: atpstar.attribute(model, pairs, "atp", nodes=latent_nodes, batch_size=args.pairs),
        "atp* nodes": lambda: atpstar.attribute(model, pairs, "atp*", batch_size=args.pairs),
        "atp* latents": lambda: atpstar.attribute(model, pairs, "atp*", nodes=latent_nodes, batch_size=args.pairs),
    }
    for name, run in runs.items():  # warm-up, and the estimates verification starts from
        seconds, results[name] = timed(run)
        print(f"warm-up {name}: {seconds:.2f} s", flush=True)
    for repeat in range(args.repeats):
        for name, run in runs.items():
            rows.setdefault(name, []).append(timed(run)[0])
            print(f"repeat {repeat} {name}: {rows[name][-1]:.2f} s", flush=True)
        for kind in ("nodes", "latents"):
            estimate = results[f"atp {kind}"]
            seconds, _ = timed(lambda: atpstar.verify(model, pairs, estimate, budget=args.verify))
            rows.setdefault(f"verify {kind}", []).append(seconds / args.verify)
            print(f"repeat {repeat} verify {kind}: {seconds:.2f} s", flush=True)
    best = {name: min(times) for name, times in rows.items()}
    print(f"Gemma-3-270M shape, random weights; {len(dicts)} JumpReLU dictionaries of width {args.width} "
          f"(~{args.l0} active per token); {args.pairs} pairs x {args.seq} tokens; min of {args.repeats} repeats")  # fmt: skip
    print(f"{'run':<16}{'seconds':>10}")
    for name, seconds in best.items():
        print(f"{name:<16}{seconds:>10.3f}" + ("  (per verified node)" if name.startswith("verify") else ""))
    print(f"latent atp / node atp:             {best['atp latents'] / best['atp nodes']:.2f}  (target <= 1.3)")
    print(f"atp* / atp, latents:               {best['atp* latents'] / best['atp latents']:.2f}")
    print(f"atp* / atp, nodes:                 {best['atp* nodes'] / best['atp nodes']:.2f}")
    print(f"verify per node, latents / nodes:  {best['verify latents'] / best['verify nodes']:.2f}")


if __name__ == "__main__":
    main()
