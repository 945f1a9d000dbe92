"""Benchmark of ``atpstar.find`` against exhaustive ground truth, and of the bound's p/samples rule.

Per setting (model, task, pairs, node types; ``find_truth.SETTINGS``): exhaustive activation patching
(cached), then ``find`` at theta with AtP* as the estimator. Reported: certified or not, the true
|c| >= theta nodes found (all of them, or the certificate is wrong), the cost to certify as a fraction of
exhaustive patching, and what AtP* alone would have missed with the same budget (verifying in AtP*
order for the forward equivalents find spent after its estimate).

The grid (``--grid``): after verifying in AtP* order as find does (its first stage), the bound's
max_effect_upper for several (samples, p), with the per-node one-sided bounds (``iut``) and the union
bound (``bonferroni``) computed from the same samples.

Run:  PYTHONPATH=src python benchmarks/find_bench.py [SETTING ...] [--grid SETTING ...] [--theta 0.3]
Results accumulate in out/find_bench/results.json (rerun reuses finished settings); the markdown
tables are printed and written to out/find_bench/results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from find_truth import OUT, SETTINGS, make_pairs, truth

import atpstar
from atpstar.bound import choose_p
from atpstar.bound.statistics import node_bounds as _node_bounds
from atpstar.cost import Cost
from atpstar.engine import prepare
from atpstar.methods.subsampling import subsample
from atpstar.nodes import node_shape

RESULTS = OUT / "results.json"
GRID = [(256, 0.5), (256, choose_p(256)), (1024, choose_p(1024))]
GRID_VERIFIED = 200  # the grid bounds the nodes left after verifying AtP*'s top 200


def _load() -> dict[str, Any]:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def _store(key: str, value: Any) -> None:
    results = _load()
    results[key] = value
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(RESULTS)


def _flat_nodes(attribution: atpstar.Attribution, types: list[str]) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for t in types:
        shape = attribution.scores[t].shape
        out += [(t, tuple(int(i) for i in torch.unravel_index(torch.tensor(k), shape))) for k in range(shape.numel())]
    return out


def run_find(name: str, theta: float, models: dict[str, Any], compute_truth: bool = True) -> dict[str, Any]:
    model_id, task, n, types = SETTINGS[name]
    model = models.setdefault(model_id, atpstar.load_model(model_id))
    pairs = make_pairs(model, task, n)
    start = time.monotonic()
    estimate = atpstar.attribute(model, pairs, "atp*", types)  # deterministic: the same ranking find uses
    saved = OUT / name / "localization"
    if Path(str(saved) + ".json").is_file():  # a finished find on this setting (same pairs, theta, seed 0)
        found = atpstar.Localization.load(saved)
        wall = float(found.info.get("wall_s", float("nan")))
    else:
        found = atpstar.find(model, pairs, theta, nodes=types, estimator=estimate, seed=0)
        wall = time.monotonic() - start
        found.info["wall_s"] = wall
        found.save(saved)
    if found.theta != theta:
        raise SystemExit(f"{saved} was found at theta {found.theta}, not {theta}: delete it to rerun")
    if not Path(str(OUT / name / "truth") + ".json").is_file() and not compute_truth:
        print(f"{name}: find done ({found!r}); ground truth not computed yet (benchmarks/find_truth.py {name})")
        return {}
    exact = truth(name, model)
    nodes = _flat_nodes(exact, types)
    true_c = torch.cat([exact.scores[t].double().flatten() for t in types])  # [N]
    big = {nodes[i] for i in torch.nonzero(true_c.abs() >= theta)[:, 0].tolist()}
    missed = big - set(found.nodes)
    # AtP* alone: verify in its order with what find spent after the estimate (same cost rule as find).
    spend = found.total_cost.forward_equivalents - estimate.cost.forward_equivalents
    layers = torch.tensor([index[0] for _, index in nodes], dtype=torch.float64)
    weight = (model.n_layers - layers) / model.n_layers
    order = torch.sort(
        torch.cat([estimate.scores[t].double().abs().flatten() for t in types]), descending=True, stable=True
    ).indices
    affordable = int((n * (2 + weight[order].cumsum(0)) <= spend).sum())
    atp_verified = {nodes[i] for i in order[:affordable].tolist()}
    row = {
        "setting": name,
        "model": model_id,
        "task": task,
        "pairs": n,
        "nodes_per_pair": len(nodes),
        "theta": theta,
        "true_large": len(big),
        "found": len(big & set(found.nodes)),
        "missed": len(missed),
        "certified": found.certified,
        "certificate_correct": (not found.certified) or not missed,
        "rounds": found.rounds,
        "cost_fe": found.total_cost.forward_equivalents,
        "exhaustive_fe": exact.cost.forward_equivalents,
        "fraction": found.total_cost.forward_equivalents / exact.cost.forward_equivalents,
        "cost_by_stage": {s: c.forward_equivalents for s, c in found.cost.items()},
        "final_bound": found.certificate()["final_bound"],
        "verified": found.verified.n_verified,
        "atp_star_same_budget_verified": affordable,
        "atp_star_same_budget_missed": len(big - atp_verified),
        "wall_s": wall,
        "history": found.history,
    }
    _store(f"find/{name}", row)
    return row


def run_grid(name: str, theta: float, models: dict[str, Any]) -> list[dict[str, Any]]:
    """max_effect_upper against (samples, p) over the nodes left after verifying AtP*'s top ``GRID_VERIFIED``."""
    model_id, task, n, types = SETTINGS[name]
    model = models.setdefault(model_id, atpstar.load_model(model_id))
    pairs = make_pairs(model, task, n)
    estimate = atpstar.attribute(model, pairs, "atp*", types)
    stage1 = [(node.node_type, node.index) for node in estimate.top(GRID_VERIFIED)]
    shapes = {t: node_shape(t, model.sizes, pairs.seq_len) for t in types}
    exclude = {t: torch.zeros(s, dtype=torch.bool) for t, s in shapes.items()}
    for t, index in stage1:
        exclude[t][index] = True
    keep = torch.cat([~exclude[t].flatten() for t in types])
    rows = []
    for samples, p in GRID:
        key = f"grid/{name}/{samples}/{p:.4g}"
        if key in _load():
            rows.append(_load()[key])
            continue
        start = time.monotonic()
        cost = Cost()
        cache = prepare(model, pairs, "noising", types, cost)
        stats = subsample(
            model, cache, types, samples=samples, p=p, seed=1, design="random", cost=cost, exclude=exclude
        )
        row: dict[str, Any] = {
            "setting": name,
            "samples": samples,
            "p": p,
            "n_unverified": int(keep.sum()),
            "cost_fe": cost.forward_equivalents,
        }
        for combine in ("iut", "bonferroni"):
            estimate, upper, prob, _ = _node_bounds(stats, keep, int(keep.sum()), 0.05, theta, combine)
            row[f"max_upper_{combine}"] = float(upper[keep].max())
            row[f"prob_{combine}"] = float(prob[keep].max()) if combine == "iut" else min(1.0, float(prob[keep].sum()))
        (OUT / name).mkdir(parents=True, exist_ok=True)  # the truth may not be computed yet
        torch.save({"estimate": estimate, "keep": keep}, OUT / name / f"grid_{samples}_{p:.4g}.pt")
        row["wall_s"] = time.monotonic() - start
        _store(key, row)
        rows.append(row)
    return rows


def grid_truth_columns(row: dict[str, Any]) -> tuple[str, str]:
    """(largest true |c| left after stage 1, the bound's rank of that node) once the truth is cached."""
    name = row["setting"]
    path = OUT / name / f"grid_{row['samples']}_{row['p']:.4g}.pt"
    if not Path(str(OUT / name / "truth") + ".json").is_file() or not path.is_file():
        return "-", "-"
    exact = atpstar.Attribution.load(OUT / name / "truth")
    saved = torch.load(path)
    estimate, keep = saved["estimate"], saved["keep"]
    true_c = torch.cat([exact.scores[t].double().flatten() for t in SETTINGS[name][3]])
    worst = int(torch.nonzero(keep)[:, 0][true_c[keep].abs().argmax()])
    rank = int((estimate[keep].abs() > estimate[worst].abs()).sum()) + 1
    return f"{float(true_c[worst].abs()):.3g}", str(rank)


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| setting | pairs | nodes/pair | true ≥ θ | found | certified | rounds | cost (fe) | exhaustive (fe) | "
        "fraction | AtP* alone, same budget: missed | final max |c| bound (samples, p) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        if not key.startswith("find/"):
            continue
        b = r["final_bound"] or {}
        bound = (
            f"{b.get('max_effect_upper', float('nan')):.3g} ({b.get('samples')}, {b.get('p') or 0:.3g})" if b else "-"
        )
        lines.append(
            f"| {r['model']} {r['task']} | {r['pairs']} | {r['nodes_per_pair']:,} | {r['true_large']} | {r['found']} | "
            f"{'yes' if r['certified'] else 'no'} | {r['rounds']} | {r['cost_fe']:,.0f} | {r['exhaustive_fe']:,.0f} | "
            f"{r['fraction']:.1%} | {r['atp_star_same_budget_missed']} of {r['true_large']} "
            f"({r['atp_star_same_budget_verified']} verified) | {bound} |"
        )
    grid = [r for k, r in results.items() if k.startswith("grid/")]
    if grid:
        lines += [
            "",
            "| setting | unverified | largest true |c| left | samples | p | max_effect_upper (iut) | "
            "max_effect_upper (bonferroni) | prob_upper (iut) | prob_upper (union) | bound's rank of that node |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in grid:
            largest, rank = grid_truth_columns(r)
            lines.append(
                f"| {r['setting']} | {r['n_unverified']:,} | {largest} | {r['samples']} | {r['p']:.3g} | "
                f"{r['max_upper_iut']:.3g} | {r['max_upper_bonferroni']:.3g} | {r['prob_iut']:.3g} | "
                f"{r['prob_bonferroni']:.3g} | {rank} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="*", default=[], help=f"settings of find to run: {list(SETTINGS)}")
    parser.add_argument("--grid", nargs="*", default=[], help="settings for the (samples, p) grid")
    parser.add_argument("--theta", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-truth", action="store_true", help="run find only; tabulate when the truth is cached")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models: dict[str, Any] = {}
    for name in args.settings:
        if f"find/{name}" not in _load():
            row = run_find(name, args.theta, models, compute_truth=not args.no_truth)
            if row:
                print(json.dumps({k: v for k, v in row.items() if k != "history"}), flush=True)
    for name in args.grid:
        for row in run_grid(name, args.theta, models):
            print(json.dumps(row), flush=True)
    text = markdown(_load())
    (OUT / "results.md").write_text(text + "\n")
    print(text)
    if any(not r.get("certificate_correct", True) for r in _load().values()):
        print("WRONG CERTIFICATE in at least one setting", flush=True)
    _ = math  # (kept for readers extending the tables)


if __name__ == "__main__":
    main()
