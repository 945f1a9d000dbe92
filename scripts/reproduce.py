"""Reproduce the AtP* paper's comparison of methods (Kramár et al. 2024) at this machine's scale.

For each setting: exhaustive ground truth by activation patching, then atp, atp+qkfix, atp*,
subsampling, blocks and hierarchical; cost of verified recall per single prompt pair (geometric mean
over pairs) and over the distribution; tables and plots in ``docs/results.md`` and ``docs/figures/``.
Whether the paper's ordering (AtP* <= AtP < alternatives in cost) holds is computed from the numbers.

Settings: SmolLM2-135M attention nodes (query, key, value) on IOI-PP and CITY-PP pairs, SmolLM2 neurons
of a few layers, and the toy model(s) on all node types when they are installed.

Restricting the ground truth to some layers: ``activation_patching`` runs with ``layers=`` set to the
setting's layers, so only their nodes are patched (the others get effect 0), and with ``checkpoint=``
so an interrupted sweep resumes. Estimates are computed over all layers and then sliced to the same
layers (their cost is the full cost).

Run:  PYTHONPATH=src python scripts/reproduce.py [--quick] [--out docs]
(--quick: about 5-10 minutes on 2 CPU cores; the full run about 20 minutes on 2 idle cores, hours on a busy
machine.)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import atpstar
from atpstar import persist, tasks
from atpstar.evaluate import Evaluation, evaluate
from atpstar.result import Attribution

ATP_FAMILY = ("atp", "atp+qkfix", "atp*")
ALTERNATIVES = ("subsampling", "blocks", "hierarchical")


@dataclass
class Setting:
    name: str
    model: str
    task: str
    nodes: list[str]
    n_pairs: int
    layers: list[int] | None = None  # None: all layers
    sweeps: dict[str, list[dict]] | None = None  # method -> option sets to try (best one reported)


def settings(quick: bool) -> list[Setting]:
    if quick:
        sweeps = {"subsampling": [{"samples": 64}], "blocks": [{"block_size": 64}], "hierarchical": [{"budget": 200}]}
        found = [
            Setting("SmolLM2 IOI-PP attention (layers 24-29)", "smollm2-135m", "ioi", ["query", "key", "value"], 2,
                    list(range(24, 30)), sweeps),
            Setting("SmolLM2 CITY-PP attention (layers 24-29)", "smollm2-135m", "cities", ["query", "key", "value"], 2,
                    list(range(24, 30)), sweeps),
            Setting("SmolLM2 IOI-PP neurons (layer 29)", "smollm2-135m", "ioi", ["neuron"], 1, [29],
                    {"subsampling": [{"samples": 64}]}),
        ]
        toy_sweeps = sweeps
    else:
        sweeps = {"subsampling": [{"samples": 64}, {"samples": 256}], "blocks": [{"block_size": 4}, {"block_size": 16}],
                  "hierarchical": [{"branching": 2}, {"branching": 4}]}
        found = [
            Setting("SmolLM2 IOI-PP attention", "smollm2-135m", "ioi", ["query", "key", "value"], 4, None, sweeps),
            Setting("SmolLM2 CITY-PP attention", "smollm2-135m", "cities", ["query", "key", "value"], 4, None, sweeps),
            Setting("SmolLM2 IOI-PP neurons (layers 10, 20, 29)", "smollm2-135m", "ioi", ["neuron"], 2, [10, 20, 29],
                    {"subsampling": [{"samples": 256}]}),
        ]
        toy_sweeps = sweeps
    from atpstar.zoo import BUILTIN_MODELS

    for name in BUILTIN_MODELS:
        if name.startswith("toy"):
            found.append(Setting(f"{name} IOI-PP all node types", name, "ioi",
                                 ["neuron", "query", "key", "value", "head"], 4 if quick else 8, None, toy_sweeps))
    return found


def restrict(result: Attribution, layers: list[int] | None) -> Attribution:
    """The same result over the given layers only (layer axis: 1 of per_pair, 0 of scores)."""
    if layers is None:
        return result
    index = torch.tensor(layers)
    info = {**result.info, "layers": list(range(len(layers))), "sliced_from_layers": layers}  # complete once sliced
    return replace(result, per_pair={t: v.index_select(1, index) for t, v in result.per_pair.items()},
                   scores={t: v.index_select(0, index) for t, v in result.scores.items()}, info=info)


def ground_truth(model, pairs, setting: Setting, folder: Path) -> Attribution:
    base = folder / "ground_truth"
    if Path(str(base) + ".json").is_file():
        saved = Attribution.load(base)
        if saved.info.get("pairs_fingerprint") == pairs.fingerprint():
            return saved
    checkpoint = folder / "ground_truth.ckpt.safetensors"
    started = time.monotonic()
    truth = atpstar.attribute(model, pairs, "activation_patching", setting.nodes, layers=setting.layers,
                              checkpoint=str(checkpoint), progress=True)
    truth.info.update(wall_s=time.monotonic() - started, pairs_fingerprint=pairs.fingerprint())
    truth.save(base)
    return truth


def run_setting(setting: Setting, out: Path, figures: Path, cache: Path, models: dict) -> tuple[list[str], dict]:
    slug = "".join(c if c.isalnum() else "_" for c in setting.name.lower()).strip("_")
    folder = cache / slug
    folder.mkdir(parents=True, exist_ok=True)
    if setting.model not in models:
        models[setting.model] = atpstar.load_model(setting.model)
    model = models[setting.model]
    pairs = getattr(tasks, setting.task)(model.tokenizer, setting.n_pairs, seed=0)
    print(f"\n== {setting.name}: {pairs}", file=sys.stderr, flush=True)
    truth = restrict(ground_truth(model, pairs, setting, folder), setting.layers)
    estimates: dict[str, Attribution] = {}
    walls: dict[str, float] = {"ground truth": truth.info.get("wall_s", float("nan"))}
    candidates = [(m, {}) for m in ATP_FAMILY] + [(m, o) for m, opts in (setting.sweeps or {}).items() for o in opts]
    missing = sorted({m for m, _ in candidates if m not in atpstar.METHODS})
    candidates = [(m, o) for m, o in candidates if m in atpstar.METHODS]
    for method, options in candidates:
        label = method + ("(" + ",".join(f"{k}={v}" for k, v in options.items()) + ")" if options else "")
        started = time.monotonic()
        result = atpstar.attribute(model, pairs, method, setting.nodes, **options)
        walls[label] = time.monotonic() - started
        print(f"  {label}: {result.cost} in {walls[label]:.1f} s", file=sys.stderr, flush=True)
        estimates[label] = restrict(result, setting.layers)
    lines = [f"## {setting.name}", "",
             f"Model `{setting.model}`, task `{setting.task}`, {pairs.n_pairs} pairs of {pairs.seq_len} tokens, "
             f"metric `{pairs.metric_name}`, noising; node types {', '.join(setting.nodes)}"
             + (f", layers {setting.layers}" if setting.layers else ", all layers") + f"; "
             f"{sum(v[0].numel() for v in truth.per_pair.values()):,} nodes per pair. Ground truth: "
             f"{truth.cost.forward_equivalents:,.0f} forward equivalents, {walls['ground truth']:.0f} s.", ""]
    if setting.layers is not None:
        lines += ["Caveat: every method ran over all layers and was then sliced to these layers; the sample- and "
                  "block-based alternatives spend patches on the other layers too (their cost grows with the number "
                  "of nodes, AtP's does not), which favours the AtP family compared with a run restricted to these "
                  "layers.", ""]
    if missing:
        lines += [f"Not compared (method not registered in this installation): {', '.join(missing)}.", ""]
    verdicts = {}
    from atpstar.plots import plot_cost_curves, plot_estimate_vs_truth

    for mode in ("per_pair", "distribution"):
        if mode == "distribution" and pairs.n_pairs == 1:
            continue
        ev = evaluate(truth, _best_per_family(truth, estimates, mode), setting=mode)
        ev.save(folder / f"evaluation_{mode}.json")
        stem = figures / f"{slug}_{mode}"
        plot_cost_curves(ev, stem, title=f"{setting.name} ({mode})")
        lines += [f"### {mode.replace('_', ' ')}", "", ev.to_markdown(), "",
                  f"![cost of verified recall]({stem.relative_to(out)}.png)", ""]
        verdict = ordering(ev)
        verdicts[mode] = verdict
        lines += [f"**Ordering ({mode.replace('_', ' ')}):** {verdict['text']}", ""]
    shown = [estimates[m] for m in ("atp", "atp*")]
    stem = figures / f"{slug}_scatter"
    plot_estimate_vs_truth(truth, shown, stem)
    lines += [f"![estimate vs truth]({stem.relative_to(out)}.png)", "",
              "Wall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in walls.items()), ""]
    return lines, verdicts


def _best_per_family(truth: Attribution, estimates: dict[str, Attribution], mode: str) -> dict[str, Attribution]:
    """The AtP variants, plus the cheapest option set of each alternative (the paper's 'best setting')."""
    chosen = {m: estimates[m] for m in ATP_FAMILY}
    for family in ALTERNATIVES:
        labels = [label for label in estimates if label.split("(")[0] == family]
        if not labels:
            continue
        ev = evaluate(truth, {label: estimates[label] for label in labels}, setting=mode)
        chosen[ev.ranking()[0]] = estimates[ev.ranking()[0]]
    return chosen


def ordering(ev: Evaluation) -> dict:
    """Whether AtP* <= AtP < every alternative, by cost/oracle and at each reported K."""
    cost = {m: ev.relative_cost(m) for m in ev.curves}
    alternatives = {m: c for m, c in cost.items() if m.split("(")[0] in ALTERNATIVES}
    star_le_atp = cost["atp*"] <= cost["atp"] * (1 + 1e-9)
    best_alt = min(alternatives, key=alternatives.get) if alternatives else None
    atp_lt_alt = None if best_alt is None else cost["atp"] < alternatives[best_alt]
    star_lt_alt = None if best_alt is None else cost["atp*"] < alternatives[best_alt]
    failures_k = []
    for k in ev.report_ks():
        at = {m: float(c.cost[k - 1]) for m, c in ev.curves.items()}
        if at["atp*"] > at["atp"]:
            failures_k.append(f"K={k}: atp* {at['atp*']:.4g} > atp {at['atp']:.4g}")
        for alt in alternatives:
            if at["atp"] >= at[alt]:
                failures_k.append(f"K={k}: atp {at['atp']:.4g} >= {alt} {at[alt]:.4g}")
    parts = [f"AtP* {'≤' if star_le_atp else '>'} AtP (cost/oracle {cost['atp*']:.3g} vs {cost['atp']:.3g})"]
    if best_alt:
        parts.append(f"AtP {'<' if atp_lt_alt else '≥'} best alternative {best_alt} ({cost['atp']:.3g} vs "
                     f"{alternatives[best_alt]:.3g}); AtP* {'<' if star_lt_alt else '≥'} it")
    else:
        parts.append("no alternative method was available, so AtP < alternatives is untested")
    parts.append(f"cheapest overall: {ev.ranking()[0]} ({cost[ev.ranking()[0]]:.3g})")
    holds = star_le_atp and atp_lt_alt is not False
    text = ("the paper's ordering **holds**: " if holds else "the paper's ordering **does not hold**: ")
    text += "; ".join(parts) + "."
    if failures_k:
        text += (" Exceptions at individual K: " + "; ".join(failures_k[:8]) + ("; …" if len(failures_k) > 8 else "")
                 + ".")
    return {"holds": holds, "star_le_atp": star_le_atp, "atp_lt_alternatives": atp_lt_alt, "text": text,
            "best": ev.ranking()[0]}


def kept_sections(path: Path, generated: set[str]) -> list[str]:
    """Sections of an existing results file that this script does not write (edges, find): kept verbatim."""
    if not path.is_file():
        return []
    text = path.read_text()
    parts = text.split("\n## ")[1:]  # each part: "<heading>\n<body>", the file's title block dropped
    kept = [part for part in parts if part.split("\n", 1)[0].strip() not in generated | {"Summary"}]
    return [line for part in kept for line in ("## " + part.rstrip("\n")).split("\n") + [""]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run: few pairs, late layers only (minutes)")
    parser.add_argument("--out", default="docs", help="folder for results.md and figures/ (default docs)")
    parser.add_argument("--cache", default="out/reproduce",
                        help="folder for the resumable ground truths (default out/reproduce)")
    parser.add_argument("--cheap-first", action="store_true",
                        help="run the cheapest settings first (results.md is rewritten after each setting)")
    parser.add_argument("--only", default=None,
                        help="run only settings whose name contains this text (writes results_only.md)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    models: dict = {}
    lines = ["# Reproducing the AtP* comparison at small scale", "",
             f"Generated by `scripts/reproduce.py{' --quick' if args.quick else ''}` (atpstar {atpstar.__version__}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads). Cost of verified recall (`atpstar.evaluate`): "
             "the method's own cost in forward-pass equivalents (backward = 2 forwards) plus the exact patches, in the "
             "method's order, until the true top-K nodes are all verified, all counted in forward passes over single "
             "prompts. Verifying a node patches it on every pair of the ranking problem: in the distribution rows a "
             "verification costs P forwards (one per pair) and the method is charged its whole cost over the P pairs; "
             "in the per-pair rows (geometric mean over single prompt pairs) a verification costs 1 forward and the "
             "method is charged its cost / P. The oracle verifies exactly the true top-K: K x P forwards "
             "(distribution) or K (per pair). `cost/oracle` is the geometric mean of cost(K)/oracle(K) over "
             "log-spaced K (lower is better). Alternatives: the cheapest of the option sets tried.", ""]
    summary: list[str] = []
    chosen = [s for s in settings(args.quick) if not args.only or args.only in s.name]
    if args.cheap_first:  # the toy model first, then fewer nodes: a partial run still has whole sections
        chosen.sort(key=lambda s: (not s.model.startswith("toy"), "neuron" in s.nodes, s.task != "cities"))
    target = out / ("results_only.md" if args.only else "results.md")  # a partial run never clobbers results.md
    kept = kept_sections(target, {s.name for s in settings(False)} | {s.name for s in settings(True)})
    for done, setting in enumerate(chosen):
        try:
            cache = Path(args.cache) / ("quick" if args.quick else "full")
            section, verdicts = run_setting(setting, out, figures, cache, models)
        except atpstar.AtpstarError as err:
            section, verdicts = [f"## {setting.name}", "", f"Skipped: {err}", ""], {}
        lines += section
        for mode, verdict in verdicts.items():
            versus = {True: "yes", False: "no", None: "n/a"}[verdict["atp_lt_alternatives"]]
            summary.append(f"| {setting.name} | {mode} | {'yes' if verdict['star_le_atp'] else 'no'} | {versus} | "
                           f"{verdict['best']} |")
        pending = [s.name for s in chosen[done + 1 :]]
        note = [f"Partial run: not yet computed: {', '.join(pending)}.", ""] if pending else []
        head = ["## Summary", "", "| setting | ranking | AtP* ≤ AtP | AtP < alternatives | cheapest |",
                "|---|---|---|---|---|", *summary, "", *note, f"Total wall time {time.monotonic() - started:.0f} s.", ""]
        text = "\n".join(lines[:4] + head + lines[4:] + kept) + "\n"
        persist.write_text(target, text)  # after every setting: an interrupt keeps the finished ones
    print(f"wrote {target} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
