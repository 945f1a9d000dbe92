"""Coverage of ``find``'s certificates over seeds: how often a certified run missed a node with |c| >= θ.

For each setting the exhaustive truth (activation patching) is computed once and cached; ``find`` then runs
with ``seeds`` bound seeds. Printed per setting: the fraction of certified runs that missed a node with
|c| >= θ (must be at most α), the fraction certified, the mean and largest cost as a fraction of exhaustive
patching, and why the runs that did not certify stopped (calibration refusing, most often).

Settings: tiny 2-layer Llama-shaped models (hidden 32, ``atpstar.testing.fixtures.tiny_model``) with their
attention saturated (queries scaled, so joint patches interact strongly) or left as built; the estimate is
AtP*, or AtP* with the largest node hidden (scored 0: the bound alone must catch it). Truths are cached under
``--cache``. Only the public API is used, so the same script measures an older source tree (PYTHONPATH).

SmolLM2 settings (``--smollm2``): SmolLM2-135M attention nodes on the first 1 or 4 IOI pairs of
``find_truth.SETTINGS``, θ = 0.3, the AtP* estimate computed once and passed as ``estimator=``, with the exhaustive
truth of ``benchmarks/find_truth.py`` (``--truth-dir``, computed there once). The truth is also the verification
oracle: ``find``'s exact verification is replaced, in this benchmark only, by a lookup of the truth's per-pair
effects (the same exact patching of the same engine), charged what ``find`` would pay for it (its own price,
``Search.verify_cost``). The bounds and everything else run for real; only verification is looked up, so seeds
cost a bound each instead of a bound and hundreds of patched nodes. ``--real`` runs seed 0 without the oracle,
to compare.

Run:  PYTHONPATH=src python benchmarks/certificates.py [--seeds 20] [--only NAME] [--cache out/cache/certificates]
      PYTHONPATH=src:benchmarks python benchmarks/certificates.py --smollm2 --truth-dir out/find_bench [--real]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import atpstar
from atpstar.cost import Cost
from atpstar.find import state as find_state
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


SMOLLM2 = {"smollm2 IOI attention, 1 pair": "smollm2_ioi_1", "smollm2 IOI attention, 4 pairs": "smollm2_ioi_4"}


@contextlib.contextmanager
def truth_oracle(truth: atpstar.Attribution) -> Iterator[None]:
    """``find``'s in-process verification answered from ``truth`` (per-pair exact effects), at ``find``'s own price."""
    original = find_state.Search._verify_by_layer

    def lookup(self: Any, space: Any, nodes: list[Any], stage: str, key: Any) -> torch.Tensor:
        effects = torch.stack([truth.per_pair[t][(slice(None), *index)].double() for t, index in nodes])  # [k, P]
        flat = torch.tensor([_flat_index(self.layout, t, index) for t, index in nodes], dtype=torch.long)  # [k]
        self.add_cost(stage, Cost(forward=float(self.verify_cost(flat)[-1])))
        self.base_metric = torch.zeros(self.job.n_pairs, dtype=torch.float64)
        return effects

    find_state.Search._verify_by_layer = lookup
    try:
        yield
    finally:
        find_state.Search._verify_by_layer = original


def _flat_index(layout: Any, node_type: str, index: tuple[int, ...]) -> int:
    """Position of ``(node_type, index)`` on a ``NodeLayout``'s flat axis."""
    shape, offset = layout.shapes[node_type], 0
    for axis, i in enumerate(index):
        offset = offset * shape[axis] + i
    return layout.span(node_type).start + offset


def run_smollm2(name: str, key: str, seeds: int, args: argparse.Namespace) -> dict[str, Any]:
    """``find`` over ``seeds`` bound seeds on a SmolLM2 setting with cached truth (the oracle unless ``--real``)."""
    import find_truth

    find_truth.OUT = Path(args.truth_dir)
    model_id, task, n_pairs, nodes = find_truth.SETTINGS[key]
    model = atpstar.load_model(model_id)
    pairs = find_truth.make_pairs(model, task, n_pairs)
    truth = find_truth.truth(key, model)
    estimate = cached(Path(args.truth_dir) / key / "atp_star", lambda: atpstar.attribute(model, pairs, "atp*", nodes))
    theta = args.theta
    large = {(t, tuple(int(i) for i in idx)) for t in nodes for idx in torch.nonzero(truth.scores[t].abs() >= theta)}
    rows, stops, stages = [], Counter(), Counter()
    for seed in range(seeds):
        oracle = contextlib.nullcontext() if args.real else truth_oracle(truth)
        with oracle:
            found = atpstar.find(model, pairs, theta, nodes=nodes, estimator=estimate, alpha=args.alpha, seed=seed,
                                 **_overspend(args))  # fmt: skip
        rows.append((found.certified, bool(large - set(found.nodes)), found.cost_fraction, found.certified_by))
        for stage, cost in found.certificate()["cost_by_stage"].items():
            stages[stage] += cost / seeds
        if not found.certified or found.certified_by == "exhaustion":
            stops[(found.info.get("finish") or found.info.get("stopped", ""))[:100]] += 1
        print(f"<!-- {name} seed {seed}: {found!r} {found.cost_fraction:.1%} by {found.certified_by} -->", flush=True)
    return _summary(name, sum(truth.scores[t].numel() for t in nodes), theta, large, rows, stops, stages)


def _summary(name: str, n_nodes: int, theta: float, large: set[Any], rows: list[Any], stops: Counter,
             stages: Counter | None = None) -> dict[str, Any]:  # fmt: skip
    certified = [r for r in rows if r[0]]
    return {
        "setting": name,
        "nodes": n_nodes,
        "theta": theta,
        "n_large": len(large),
        "runs": len(rows),
        "certified": len(certified) / len(rows),
        "by_bound": sum(1 for r in rows if r[3] == "bound") / len(rows),
        "missed_given_certified": (sum(r[1] for r in certified) / len(certified)) if certified else float("nan"),
        "cost_mean": sum(r[2] for r in rows) / len(rows),
        "cost_max": max(r[2] for r in rows),
        "stops": dict(stops),
        "stages": dict(stages or {}),
    }


def _overspend(args: argparse.Namespace) -> dict[str, float]:
    """``max_overspend`` when asked for (an older source tree's ``find`` has no such option)."""
    return {} if args.max_overspend is None else {"max_overspend": args.max_overspend}


def run_setting(name: str, spec: Any, seeds: int, cache: Path, alpha: float, extra: dict[str, Any]) -> dict[str, Any]:
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
        found = atpstar.find(model, pairs, theta, nodes=nodes, estimator=estimate, alpha=alpha, seed=seed, **extra)
        missed = bool(large - set(found.nodes))
        rows.append((found.certified, missed, found.cost_fraction, getattr(found, "certified_by", None)))
        if not found.certified or getattr(found, "certified_by", None) == "exhaustion":
            stops[(found.info.get("finish") or found.info.get("stopped", ""))[:80]] += 1
    return _summary(name, sum(truth.scores[t].numel() for t in nodes), theta, large, rows, stops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--cache", default="out/cache/certificates")
    parser.add_argument("--only", default=None, help="run the settings whose name contains this")
    parser.add_argument("--smollm2", action="store_true", help="the SmolLM2 settings (truth from --truth-dir)")
    parser.add_argument("--truth-dir", default="out/find_bench", help="find_truth.py's cache of exhaustive truths")
    parser.add_argument("--theta", type=float, default=0.3, help="θ of the SmolLM2 settings")
    parser.add_argument("--real", action="store_true", help="SmolLM2: verify for real (no oracle)")
    parser.add_argument("--max-overspend", type=float, default=None, help="find's max_overspend (default: its own)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings: dict[str, Any] = SMOLLM2 if args.smollm2 else toy_settings()
    print(
        f"| setting | nodes | θ | nodes ≥ θ | runs | certified | by a bound | missed / certified (≤ {args.alpha:g}) "
        "| cost mean | cost max |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, spec in settings.items():
        if args.only and args.only not in name:
            continue
        start = time.monotonic()
        if args.smollm2:
            row = run_smollm2(name, spec, args.seeds, args)
        else:
            row = run_setting(name, spec, args.seeds, Path(args.cache), args.alpha, _overspend(args))
        print(
            f"| {row['setting']} | {row['nodes']} | {row['theta']:.3g} | {row['n_large']} | {row['runs']} | "
            f"{row['certified']:.0%} | {row['by_bound']:.0%} | {row['missed_given_certified']:.2f} | "
            f"{row['cost_mean']:.1%} | {row['cost_max']:.1%} |",
            flush=True,
        )
        for stop, count in row["stops"].items():
            print(f"|   not certified or by exhaustion ({count}×): {stop} ||||||||||")
        if row["stages"]:
            print(f"<!-- mean cost by stage (fe): { {k: round(v) for k, v in row['stages'].items()} } -->")
        print(f"<!-- {name}: {time.monotonic() - start:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
