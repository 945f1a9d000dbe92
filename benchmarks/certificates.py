"""Coverage of ``find``'s certificates over seeds: how often a certified run missed a node with |c| >= θ.

For each setting the exhaustive truth (activation patching) is computed once and cached; ``find`` then runs
with ``seeds`` bound seeds. Printed per setting: the fraction of certified runs that missed a node with
|c| >= θ (must be at most α), the fraction certified, the mean and largest cost as a fraction of exhaustive
patching, and why the runs that did not certify stopped (calibration refusing, most often).

Settings: tiny 2-layer Llama-shaped models (hidden 32, ``atpstar.testing.fixtures.tiny_model``) with their
attention saturated (queries scaled, so joint patches interact strongly) or left as built; the estimate is
AtP*, or AtP* with the largest node hidden (scored 0: the bound alone must catch it). Truths are cached under
``--cache``. Only the public API is used, so the same script measures an older source tree (PYTHONPATH).

Run:  PYTHONPATH=src python benchmarks/certificates.py [--seeds 20] [--only NAME] [--cache out/cache/certificates]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

import atpstar
from atpstar.testing.fixtures import tiny_model, tiny_pairs

FIVE = ["neuron", "query", "key", "value", "head"]


def saturated_toy(scale: float, seed: int = 8) -> atpstar.Model:
    """The 2-layer hidden-32 Llama of the fixtures with its queries scaled by ``scale`` (saturated attention)."""
    model = tiny_model(seed, n_layers=2)
    with torch.no_grad():
        for layer in model.hf_model.model.layers:
            layer.self_attn.q_proj.weight.mul_(scale)
    return model


def hide_largest(estimate: atpstar.Attribution, truth: atpstar.Attribution) -> atpstar.Attribution:
    """``estimate`` with the truth's largest node scored 0 (ranked last): only the bound can catch it."""
    flat = torch.cat([truth.scores[t].flatten().abs() for t in estimate.scores])
    index, types = int(flat.argmax()), list(estimate.scores)
    for t in types:
        n = truth.scores[t].numel()
        if index < n:
            break
        index -= n
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(index), truth.scores[t].shape))
    per_pair = {k: v.clone() for k, v in estimate.per_pair.items()}
    scores = {k: v.clone() for k, v in estimate.scores.items()}
    per_pair[t][(slice(None), *where)] = 0.0
    scores[t][where] = 0.0
    return atpstar.Attribution(
        estimate.method,
        estimate.options,
        estimate.direction,
        estimate.metric,
        estimate.model_id,
        per_pair,
        scores,
        estimate.aggregation,
        estimate.cost,
    )


def cached(path: Path, compute: Any) -> atpstar.Attribution:
    if Path(str(path) + ".json").is_file():
        return atpstar.Attribution.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = compute()
    result.save(path)
    return result


def toy_settings() -> dict[str, Any]:
    """name -> (model, pairs, node types, theta as a fraction of max |c|, whether to hide the largest node)."""
    pairs = tiny_pairs(1, 16, seed=9)
    settings = {}
    for scale in (6.0, 1.0):
        for hide in (False, True):
            name = f"llama-h32 q×{scale:g}{', largest hidden' if hide else ''}"
            settings[name] = (lambda s=scale: saturated_toy(s), pairs, FIVE, 0.5, hide)
    # θ between the largest node's Subsampling estimand (about 0.7 c) and c itself: the raw bound can miss it.
    settings["llama-h32 q×6, largest hidden, θ = 0.9 max"] = (lambda: saturated_toy(6.0), pairs, FIVE, 0.9, True)
    return settings


def run_setting(name: str, spec: Any, seeds: int, cache: Path, alpha: float) -> dict[str, Any]:
    make_model, pairs, nodes, fraction, hide = spec
    model = make_model()
    key = name.replace(" ", "_").replace(",", "").replace("×", "x")
    truth = cached(cache / key / "truth", lambda: atpstar.attribute(model, pairs, "activation_patching", nodes))
    estimate = atpstar.attribute(model, pairs, "atp*", nodes)
    if hide:
        estimate = hide_largest(estimate, truth)
    top = max(float(truth.scores[t].abs().max()) for t in nodes)
    theta = fraction * top
    large = {(t, tuple(int(i) for i in idx)) for t in nodes for idx in torch.nonzero(truth.scores[t].abs() >= theta)}
    rows, stops = [], Counter()
    for seed in range(seeds):
        found = atpstar.find(model, pairs, theta, nodes=nodes, estimator=estimate, alpha=alpha, seed=seed)
        missed = bool(large - set(found.nodes))
        rows.append((found.certified, missed, found.cost_fraction))
        if not found.certified:
            stops[found.info.get("stopped", "")[:80]] += 1
    certified = [r for r in rows if r[0]]
    return {
        "setting": name,
        "nodes": sum(truth.scores[t].numel() for t in nodes),
        "theta": theta,
        "n_large": len(large),
        "runs": len(rows),
        "certified": len(certified) / len(rows),
        "missed_given_certified": (sum(r[1] for r in certified) / len(certified)) if certified else float("nan"),
        "cost_mean": sum(r[2] for r in rows) / len(rows),
        "cost_max": max(r[2] for r in rows),
        "stops": dict(stops),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--cache", default="out/cache/certificates")
    parser.add_argument("--only", default=None, help="run the settings whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = toy_settings()
    print(
        f"| setting | nodes | θ | nodes ≥ θ | runs | certified | missed / certified (≤ {args.alpha:g}) | cost mean | cost max |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, spec in settings.items():
        if args.only and args.only not in name:
            continue
        start = time.monotonic()
        row = run_setting(name, spec, args.seeds, Path(args.cache), args.alpha)
        print(
            f"| {row['setting']} | {row['nodes']} | {row['theta']:.3g} | {row['n_large']} | {row['runs']} | "
            f"{row['certified']:.0%} | {row['missed_given_certified']:.2f} | {row['cost_mean']:.1%} | "
            f"{row['cost_max']:.1%} |",
            flush=True,
        )
        for stop, count in row["stops"].items():
            print(f"|   not certified ({count}×): {stop} |||||||||")
        print(f"<!-- {name}: {time.monotonic() - start:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
