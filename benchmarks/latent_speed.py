"""Latent AtP against node AtP: wall time on Gemma-3-270M's shape with 16k-wide dictionaries on every layer.

Model: Gemma-3-270M's config (``~/.cache/atpstar/gemma-3-270m/config.json``, the built-in model's; else the
same sizes typed in: 18 layers, d_model 640, 4 heads, 1 kv-head, d_head 256, d_mlp 2048, vocab 262144) with
random weights. Dictionaries: JumpReLU SAEs of width 16384 (Gemma Scope 2's 16k) on ``blocks.{l}.hook_resid_post``
of every layer that has a run site after it (l = 0 .. 16; the last layer's resid_post is the final stream),
random weights with thresholds set so about ``--l0`` latents fire per token, as trained SAEs do.

Rows (seconds are the minimum over ``--repeats`` interleaved repeats, every row once per repeat in an order
rotated each repeat; ``--clock cpu`` counts this process's CPU time, which leaves out waiting for a core on a
loaded machine; per-repeat ratios, median and range, use ``benchmarks/trees.py``'s helpers):

- ``fwd+bwd``: one forward and backward of the pairs (the unit of ``atp_speed.py``);
- ``encoders``: every dictionary's encoder on both prompts' activations, the least latent AtP adds;
- ``atp`` on the default node types vs ``atp`` on every latent and error node (target: ratio <= 1.3);
- ``atp*`` on each, as a ratio to its own ``atp`` (target: the latent ratio <= the node ratio);
- ``verify`` of the top ``--verify`` nodes of each estimate, per verified node (batching like node
  verification: the per-node time should be of the order of the node one).

Usage: python benchmarks/latent_speed.py [--pairs 4] [--seq 16] [--repeats 3] [--verify 32] [--width 16384]
       [--clock cpu] [--threads 1] [--dense-products] [--no-screen]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # trees.py
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
    with torch.no_grad():  # both prompts: thresholds fitted on clean tokens alone fire ~4x more on noise tokens
        model.run_layers(model.embed(torch.cat([pairs.clean, pairs.noise])), run)
    out = []
    gen = torch.Generator().manual_seed(0)
    for layer in range(model.n_layers - 1):
        x = run.get("resid_pre", layer + 1).reshape(-1, model.d_model)  # [2P*T, D]
        w_enc = torch.randn(model.d_model, width, generator=gen) / x.norm(dim=-1).mean()
        pre = x @ w_enc  # [2P*T, S]
        # [S]: ~l0 of S fire per token: each latent's pre-activation over tokens taken as normal (a quantile of
        # the few benchmark tokens would put the threshold at a sample maximum: L0 of several hundred)
        z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - l0 / width))
        threshold = (pre.mean(0) + z * pre.std(0)).clamp(min=1e-3)
        w_dec = torch.randn(width, model.d_model, generator=gen) / width**0.5
        out.append(Dictionary(name=f"res{layer}-16k", hook=f"blocks.{layer}.hook_resid_post", layer=layer,
                              W_enc=w_enc, W_dec=w_dec, b_enc=torch.zeros(width), b_dec=torch.zeros(model.d_model),
                              activation="jumprelu", threshold=threshold))  # fmt: skip
    return out


def dictionary_inputs(model: Any, pairs: Any, dicts: list[Any]) -> list[torch.Tensor]:
    """Each dictionary's input on both prompts, [2P, T, D] (recorded once: the encoder row times encoders only)."""
    from atpstar.runner import Run

    runs = [Run(model.n_layers, record={"resid_pre"}) for _ in range(2)]
    with torch.no_grad():
        for run, tokens in zip(runs, (pairs.clean, pairs.noise)):
            model.run_layers(model.embed(tokens), run)
    return [torch.cat([run.get("resid_pre", d.layer + 1) for run in runs]) for d in dicts]


def encode_all(dicts: list[Any], inputs: list[torch.Tensor]) -> None:
    """The dictionaries' encoders on both prompts' activations (what latent AtP adds at the least)."""
    from atpstar.dictionaries.screen import encode_many

    with torch.no_grad():
        for d, x in zip(dicts, inputs):
            encode_many(d, x)


def measure(fn: Any, clock: str) -> tuple[float, Any]:
    """(seconds on ``clock``, the value) of one call."""
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return (time.process_time() - cpu) if clock == "cpu" else (time.perf_counter() - start), value


def main() -> None:
    from trees import forward_backward

    import atpstar

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--verify", type=int, default=32)
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--l0", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or this process's CPU time (leaves out waiting for a core)")  # fmt: skip
    parser.add_argument(
        "--dense-products",
        action="store_true",
        help="products with Δf as dense matmuls (atpstar.dictionaries.sparse off), for comparison",
    )
    parser.add_argument("--no-screen", action="store_true", help="dense encoders (atpstar.dictionaries.screen off)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.dense_products:
        from atpstar.dictionaries import sparse

        sparse.DENSE_SHARE = -1.0
    if args.no_screen:
        from atpstar.dictionaries import screen

        screen.MIN_LATENTS = 2**62
    model = build_model()
    vocab = model.hf_model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (2, args.pairs, args.seq), generator=gen)
    pairs = atpstar.PromptPairs(tokens[0], tokens[1], answer=torch.arange(args.pairs),
                                distractor=torch.arange(args.pairs) + 100)  # fmt: skip
    dicts = build_dictionaries(model, args.width, args.l0, pairs)
    latent_nodes = atpstar.api.with_dictionaries([], dicts)
    inputs = dictionary_inputs(model, pairs, dicts)
    n = args.pairs
    calls = {
        "fwd+bwd": lambda: forward_backward(model, pairs),
        "encoders": lambda: encode_all(dicts, inputs),
        "atp nodes": lambda: atpstar.attribute(model, pairs, "atp", batch_size=n),
        "atp latents": lambda: atpstar.attribute(model, pairs, "atp", nodes=latent_nodes, batch_size=n),
        "atp* nodes": lambda: atpstar.attribute(model, pairs, "atp*", batch_size=n),
        "atp* latents": lambda: atpstar.attribute(model, pairs, "atp*", nodes=latent_nodes, batch_size=n),
    }
    results: dict[str, Any] = {}
    for name, call in calls.items():  # warm-up, and the estimates verification starts from
        seconds, results[name] = measure(call, args.clock)
        print(f"warm-up {name}: {seconds:.2f} s", flush=True)
    for kind in ("nodes", "latents"):
        estimate = results[f"atp {kind}"]
        calls[f"verify {kind}"] = lambda e=estimate: atpstar.verify(model, pairs, e, budget=args.verify)
    rows: dict[str, list[float]] = {}
    names = list(calls)
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:  # rotated: no call always runs after the same one
            seconds, _ = measure(calls[name], args.clock)
            rows.setdefault(name, []).append(seconds / (args.verify if name.startswith("verify") else 1))
            print(f"repeat {repeat} {name}: {seconds:.2f} s", flush=True)
    print_table(args, dicts, rows, results)


def print_table(args: Any, dicts: list[Any], rows: dict[str, list[float]], results: dict[str, Any]) -> None:
    from trees import describe, paired_ratios, spread

    from atpstar.dictionaries import screen

    best = {name: min(times) for name, times in rows.items()}
    load = os.getloadavg()
    qk = results["atp* latents"].info.get("latent_qk_fix_cost", {})
    print()
    print(f"## Latent AtP on a Gemma-3-270M-shaped model (random weights), {len(dicts)} JumpReLU dictionaries of "
          f"width {args.width} (~{args.l0} active per token), {args.pairs} pairs x {args.seq} tokens")  # fmt: skip
    print()
    print(f"{args.repeats} interleaved repeats, {args.clock} clock, {args.threads} thread(s); load average "
          f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} on {os.cpu_count()} cores; encoder screen "
          f"{'on' if screen.screens(dicts[0], torch.zeros(1, dicts[0].d_in)) else 'off'}.")  # fmt: skip
    print()
    print("| call | min s | spread (median / max over min) |")
    print("|---|---:|---:|")
    for name, times in rows.items():
        unit = " (per verified node)" if name.startswith("verify") else ""
        print(f"| {name}{unit} | {best[name]:.3f} | {spread(times)} |")
    print()
    print("| ratio | of minima | per repeat, median (range) | target |")
    print("|---|---:|---:|---|")
    node_ratio = best["atp* nodes"] / best["atp nodes"]
    ratios = [
        ("latent atp / node atp", "atp latents", "atp nodes", 1.3),
        ("encoders / node atp", "encoders", "atp nodes", None),
        ("atp* / atp, nodes", "atp* nodes", "atp nodes", None),
        ("atp* / atp, latents", "atp* latents", "atp latents", node_ratio),
        ("verify per node, latents / nodes", "verify latents", "verify nodes", None),
    ]
    for label, top, bottom, target in ratios:
        value = best[top] / best[bottom]
        goal = f"<= {target:.2f}: {'met' if value <= target else 'NOT met'}" if target else ""
        print(f"| {label} | {value:.2f} | {describe(paired_ratios(rows[top], rows[bottom]))} | {goal} |")
    print()
    print(f"latent atp* QK fix: {qk.get('forward', 0):.2f} forwards and {qk.get('backward', 0):.2f} backwards "
          f"added, in passes over the {args.pairs} pairs (one q/k projection per changed latent and error node)")  # fmt: skip


if __name__ == "__main__":
    main()
