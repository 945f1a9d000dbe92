"""atpstar vs TransformerLens 4: exact head patching and AtP on the same GPT-NeoX model.

Model: a Pythia-70m-shaped GPT-NeoX (6 layers, d_model 512, 8 heads, d_mlp 2048, rotary_pct 0.25,
parallel residual, vocab 50304) with random weights from a config (no hub access needed). atpstar
and TransformerLens each get their own deep copy of the same Hugging Face model. TransformerLens
4 has no ``HookedTransformer``; it wraps the Hugging Face model in a ``TransformerBridge``
(``boot_transformers(..., hf_model=...)``), which keeps the raw HF weights (no fold_ln, no
centering: compatibility mode is NOT enabled), so both libraries compute the same function.

One prompt pair of random token ids (default 16 tokens), metric = logit difference at the last
position (answer minus distractor), direction = denoising (TransformerLens' convention: clean
activations patched into the corrupted run; atpstar's ``noise`` prompt is TL's corrupted prompt).

Compared, values and wall time:
  (a) exact patching of every head output at every position:
      ``transformer_lens.patching.get_act_patch_attn_head_out_by_pos`` (one full forward per
      (layer, pos, head), layout [L, T, H], value = patched metric) minus the corrupted baseline
      vs ``atpstar.attribute(..., method="activation_patching", nodes=["head"],
      direction="denoising").per_pair["head"][0]`` (layout [L, H, T]).
  (b) AtP for head outputs (``hook_z``): the TransformerLens docs recipe (forward hooks cache z
      on the clean and corrupted runs, backward hooks cache dmetric/dz on the corrupted run,
      ``metric.backward()``, estimate = sum_d (z_clean - z_corr) * grad_corr), and a leaner TL
      variant (parameters frozen, zero "delta" leaves added at hook_z, ``torch.autograd.grad``),
      vs ``atpstar.attribute(..., method="atp", nodes=["head"], direction="denoising")``.
Timing: every method runs ``--repeats`` times interleaved in one process with
``torch.set_num_threads(2)``; the table shows the median and atpstar/TL ratio of medians.

Setup (dev-only, a separate environment outside the repo; pin torch first or pip pulls a CUDA
build of several GB):

    python3 -m venv ../peers-venv
    ../peers-venv/bin/pip install torch==2.13.0
    ../peers-venv/bin/pip install 'transformer-lens==4.3.0'      # brings transformers 5.x
    ../peers-venv/bin/pip install -e . --no-deps
    ../peers-venv/bin/pip install transformers safetensors numpy tqdm
    # or: ../peers-venv/bin/pip install -r benchmarks/peers_requirements.txt (after torch)

Usage:
    HF_HUB_OFFLINE=1 ../peers-venv/bin/python benchmarks/peers.py [--seq 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # TL's patching loop draws a tqdm bar per sweep
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers as tf  # noqa: E402

import atpstar  # noqa: E402


ROTARY_PCT = 0.25  # transformers 5 moves it into config.rope_parameters; keep our own copy to print


def neox_config() -> tf.GPTNeoXConfig:
    """Pythia-70m's shape."""
    return tf.GPTNeoXConfig(
        num_hidden_layers=6, num_attention_heads=8, hidden_size=512, intermediate_size=2048,
        vocab_size=50304, rotary_pct=ROTARY_PCT, use_parallel_residual=True, max_position_embeddings=2048,
        attention_dropout=0.0, hidden_dropout=0.0,
    )


def offline_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer ``t0 .. t{V-1}`` saved and reloaded from a local folder.

    TransformerLens' bridge insists on a tokenizer and reloads it by ``name_or_path``; the prompts
    here are token ids, so the tokenizer is never used for the numbers.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="t0", bos_token="t0", eos_token="t0",
                                     pad_token="t0")
    folder = tempfile.mkdtemp(prefix="peers_tok_")
    tok.save_pretrained(folder)
    return tf.AutoTokenizer.from_pretrained(folder)


def tl_bridge(hf: Any, tokenizer: Any) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        "EleutherAI/pythia-70m", hf_model=hf, tokenizer=tokenizer, device="cpu", dtype=torch.float32
    )
    bridge.eval()
    return bridge


# --------------------------------------------------------------------------------------------
# TransformerLens side


def tl_exact(bridge: Any, clean: torch.Tensor, corrupted: torch.Tensor,
             metric: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Denoising effect of every head output by position, [L, H, T] (TL's [L, T, H] transposed)."""
    from transformer_lens import patching

    with torch.inference_mode():
        _, clean_cache = bridge.run_with_cache(clean, names_filter=lambda n: n.endswith("attn.hook_z"))
        corrupted_metric = metric(bridge(corrupted))
        patched = patching.get_act_patch_attn_head_out_by_pos(bridge, corrupted, clean_cache, metric)
    return (patched - corrupted_metric).permute(0, 2, 1)


def tl_atp_docs(bridge: Any, clean: torch.Tensor, corrupted: torch.Tensor,
                metric: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The TransformerLens docs' attribution-patching recipe (forward + backward caches), [L, H, T]."""
    n_layers = bridge.cfg.n_layers
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    with torch.inference_mode():
        _, clean_cache = bridge.run_with_cache(clean, names_filter=lambda n: n in names)
    bridge.reset_hooks()
    fwd: dict[str, torch.Tensor] = {}
    bwd: dict[str, torch.Tensor] = {}

    # Keyed by the name we hook (hook.name can be the bridge's canonical alias, e.g. attn.o.hook_in).
    def fwd_hook(name: str) -> Callable[..., None]:
        def hook(act: torch.Tensor, hook: Any) -> None:
            fwd[name] = act.detach()
        return hook

    def bwd_hook(name: str) -> Callable[..., None]:
        def hook(grad: torch.Tensor, hook: Any) -> None:
            bwd[name] = grad.detach()
        return hook

    for name in names:
        bridge.add_hook(name, fwd_hook(name), "fwd")
        bridge.add_hook(name, bwd_hook(name), "bwd")
    try:
        value = metric(bridge(corrupted))
        value.backward()
    finally:
        bridge.reset_hooks()
        bridge.zero_grad(set_to_none=True)
    rows = [((clean_cache[n] - fwd[n]) * bwd[n]).sum(-1)[0] for n in names]  # [T, H] each
    return torch.stack(rows).permute(0, 2, 1)


def tl_atp_lean(bridge: Any, clean: torch.Tensor, corrupted: torch.Tensor,
                metric: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """AtP with TL hooks but no parameter gradients: zero leaves added at hook_z, autograd.grad."""
    n_layers = bridge.cfg.n_layers
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    with torch.inference_mode():
        _, clean_cache = bridge.run_with_cache(clean, names_filter=lambda n: n in names)
    corr: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}

    def add_delta(name: str) -> Callable[..., torch.Tensor]:
        def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
            corr[name] = act.detach()
            deltas[name] = torch.zeros_like(act, requires_grad=True)
            return act + deltas[name]
        return hook

    value = metric(bridge.run_with_hooks(corrupted, fwd_hooks=[(n, add_delta(n)) for n in names]))
    grads = torch.autograd.grad(value, [deltas[n] for n in names])
    rows = [((clean_cache[n] - corr[n]) * g).sum(-1)[0] for n, g in zip(names, grads)]
    return torch.stack(rows).permute(0, 2, 1)


# --------------------------------------------------------------------------------------------


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(max |a - b|, max |b|, Pearson correlation) over all entries."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    corr = float(torch.corrcoef(torch.stack([a64, b64]))[0, 1])
    return float((a64 - b64).abs().max()), float(b64.abs().max()), corr


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=16, help="prompt length in tokens")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import transformer_lens

    config = neox_config()
    hf = tf.AutoModelForCausalLM.from_config(config).eval()
    n_params = sum(p.numel() for p in hf.parameters()) / 1e6
    model = atpstar.load_model(copy.deepcopy(hf))
    bridge = tl_bridge(copy.deepcopy(hf), offline_tokenizer(config.vocab_size))

    gen = torch.Generator().manual_seed(args.seed)
    clean = torch.randint(0, config.vocab_size, (1, args.seq), generator=gen)
    corrupted = torch.randint(0, config.vocab_size, (1, args.seq), generator=gen)
    answer, distractor = (int(x) for x in torch.randint(0, config.vocab_size, (2,), generator=gen))
    pairs = atpstar.PromptPairs(clean, corrupted, answer=[answer], distractor=[distractor], metric="logit_diff")

    def metric(logits: torch.Tensor) -> torch.Tensor:
        """Plain logit difference at the last position, mean over the batch (a scalar for TL)."""
        return (logits[:, -1, answer] - logits[:, -1, distractor]).mean()

    with torch.inference_mode():
        hf_logits = hf(clean).logits
        drift = float((bridge(clean) - hf_logits).abs().max())
        clean_metric, corrupted_metric = float(metric(hf_logits)), float(metric(hf(corrupted).logits))

    runners: dict[str, Callable[[], torch.Tensor]] = {
        "atpstar exact": lambda: atpstar.attribute(
            model, pairs, method="activation_patching", nodes=["head"], direction="denoising"
        ).per_pair["head"][0],
        "TL exact": lambda: tl_exact(bridge, clean, corrupted, metric),
        "atpstar AtP": lambda: atpstar.attribute(
            model, pairs, method="atp", nodes=["head"], direction="denoising"
        ).per_pair["head"][0],
        "TL AtP (docs recipe)": lambda: tl_atp_docs(bridge, clean, corrupted, metric),
        "TL AtP (lean)": lambda: tl_atp_lean(bridge, clean, corrupted, metric),
    }
    for name, fn in runners.items():  # warm-up (lazy init, allocator), not timed; TL exact is
        if name != "TL exact":  # hundreds of bridge forwards, already warmed by the TL AtP runs
            fn()
    times: dict[str, list[float]] = {name: [] for name in runners}
    values: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name, fn in runners.items():
            seconds, values[name] = timed(fn)
            times[name].append(seconds)
            print(f"  {name}: {seconds:.3f} s", flush=True)
    median = {name: statistics.median(ts) for name, ts in times.items()}

    shape = tuple(values["atpstar exact"].shape)
    n_nodes = values["atpstar exact"].numel()
    print(f"\nModel: GPT-NeoX, Pythia-70m shape, random weights ({n_params:.1f}M params: "
          f"{config.num_hidden_layers} layers, d_model {config.hidden_size}, {config.num_attention_heads} heads, "
          f"rotary_pct {ROTARY_PCT}, parallel residual), float32, CPU, "
          f"torch.set_num_threads({torch.get_num_threads()}).")
    print(f"One pair of {args.seq} random tokens; metric logit_diff (clean {clean_metric:+.4f}, corrupted "
          f"{corrupted_metric:+.4f}); direction denoising; head nodes [L, H, T] = {shape} = {n_nodes} nodes.")
    print(f"Versions: atpstar {getattr(atpstar, '__version__', '?')}, transformer-lens "
          f"{transformer_lens.__version__ if hasattr(transformer_lens, '__version__') else _dist_version('transformer-lens')}, "
          f"transformers {tf.__version__}, torch {torch.__version__}. "
          f"TL bridge vs HF logits max |diff| {drift:.2e}.")
    print(f"Times: median of {args.repeats} interleaved runs (after one untimed warm-up, except TL exact).\n")

    rows = [
        ("(a) exact patching, head outputs by pos", "atpstar exact", "TL exact",
         f"{n_nodes} patched forwards (TL: full forwards)"),
        ("(b) AtP, head outputs (hook_z)", "atpstar AtP", "TL AtP (docs recipe)", "2 fwd + 1 bwd"),
        ("(b') AtP, head outputs (hook_z)", "atpstar AtP", "TL AtP (lean)", "2 fwd + 1 bwd, no param grads"),
    ]
    print("| comparison | TL method | atpstar s | TL s | atpstar/TL | max abs diff | max abs value | correlation |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, ours, theirs, _ in rows:
        diff, scale, corr = agreement(values[ours], values[theirs])
        print(f"| {label} | {theirs} | {median[ours]:.3f} | {median[theirs]:.3f} | "
              f"{median[ours] / median[theirs]:.3f} | {diff:.2e} | {scale:.2e} | {corr:.8f} |")
    diff, scale, corr = agreement(values["atpstar AtP"], values["atpstar exact"])
    print(f"\nFor scale, AtP vs exact (atpstar): max abs diff {diff:.2e}, correlation {corr:.4f}.")
    print("All timings (s): " + "; ".join(f"{n}: " + ", ".join(f"{t:.3f}" for t in ts) for n, ts in times.items()))


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
