"""MIB's CPR and CMD of the edge methods on the built-in real models, with their cost.

For SmolLM2-135M and Gemma-3-270M, on IOI (the built-in ``tasks.ioi``, pairs of one length) and an
MCQA task in MIB's ``copycolors_mcqa`` schema (rows below, read by ``tasks.mib`` into a ``PairSet`` of
several lengths): EAP (``atp``), EAP-IG (``atp+ig``, 5 steps as MIB), edge AtP* (``atp*``) and exact
edge patching (``activation_patching``), all with MIB's head-sender convention; CPR and CMD by
``faithfulness_curve`` (MIB's fractions, pruning, signed ranking for CPR, |score| for CMD). Exact edge
patching is skipped when its predicted cost exceeds ``--max-exact`` forward equivalents (the table
then shows the prediction). Each cell is cached as JSON under ``--cache``; a rerun prints the table.

    PYTHONPATH=src python benchmarks/mib_real.py --pairs 4 --cache out/cache/mib_real
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import atpstar

METHODS = {
    "EAP": ("atp", {}),
    "EAP-IG": ("atp+ig", {"ig_steps": 5}),
    "edge AtP*": ("atp*", {}),
    "exact edge patching": ("activation_patching", {}),
}
MODELS = ("smollm2-135m", "gemma-3-270m")

# Copying colours from context, in the schema of mib-bench/copycolors_mcqa (4_answer_choices): the
# counterfactual permutes the options, so the correct letter moves.
OBJECTS = [("banana", "yellow"), ("grass", "green"), ("sky", "blue"), ("snow", "white"), ("coal", "black"),
           ("tomato", "red")]  # fmt: skip
LETTERS = ["A", "B", "C", "D"]


def mcqa_rows(n: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        thing, colour = OBJECTS[i % len(OBJECTS)]
        others = [c for _, c in OBJECTS if c != colour][i % 3 : i % 3 + 3]
        options = [colour, *others][: 2 + i % 3]  # 2 to 4 options: prompts of several lengths
        answer = i % len(options)
        options[0], options[answer] = options[answer], options[0]
        shifted = options[1:] + options[:1]

        def prompt(opts: list[str]) -> str:
            lines = "\n".join(f"{LETTERS[k]}. {c}" for k, c in enumerate(opts))
            return f"The {thing} is {colour}. What color is the {thing}?\n{lines}\nAnswer:"

        labels = LETTERS[: len(options)]
        rows.append({
            "prompt": prompt(options), "choices": {"label": labels, "text": options}, "answerKey": answer,
            "symbol_counterfactual": {"prompt": prompt(shifted), "choices": {"label": labels, "text": shifted},
                                      "answerKey": shifted.index(colour)},
        })  # fmt: skip
    return rows


def task_pairs(model: Any, task: str, n: int, cache: Path) -> Any:
    if task == "ioi":
        return atpstar.tasks.ioi(model.tokenizer, n, seed=0)
    folder = cache / "copycolors_mcqa" / "4_answer_choices"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mcqa_rows(3 * n)))
    return atpstar.tasks.mib("mcqa", "validation", tokenizer=model.tokenizer, path=folder.parent, n=n)


def cell(model: Any, pairs: Any, name: str, max_exact: float) -> dict[str, Any]:
    method, options = METHODS[name]
    options = {**options, "edge_convention": "mib"}
    if method == "activation_patching":
        predicted = atpstar.METHODS[method](**options).expected_cost(model, pairs, ["edge"], {}).forward_equivalents
        if predicted > max_exact:
            return {"skipped": True, "cost": predicted}
    start = time.time()
    result = atpstar.attribute(model, pairs, method=method, nodes=["edge"], **options)
    seconds = time.time() - start
    curve = atpstar.faithfulness_curve(model, pairs, result)
    return {
        "cpr": curve.cpr,
        "cmd": curve.cmd,
        "cost": result.cost.forward_equivalents,
        "seconds": seconds,
        "curve_cost": curve.cost.get("forward_equivalents", sum(curve.cost.values())),
        "n_edges": len(atpstar.edge_names(model)),
        "n_pairs": pairs.n_pairs,
        "lengths": sorted({int(x) for x in getattr(pairs, "lengths", [pairs.seq_len])}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--tasks", nargs="+", default=["ioi", "mcqa"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--max-exact", type=float, default=30000.0, help="forward equivalents (default 30000)")
    parser.add_argument("--cache", default="out/cache/mib_real")
    parser.add_argument("--cached-only", action="store_true", help="print the cells already cached, run nothing")
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for model_id in args.models:
        model = None
        for task in args.tasks:
            pairs = None
            for name in args.methods:
                path = cache / f"{model_id}_{task}_{args.pairs}_{name.replace(' ', '-')}.json"
                if not path.exists() and args.cached_only:
                    continue
                if not path.exists():
                    model = model or atpstar.load_model(model_id)
                    pairs = pairs or task_pairs(model, task, args.pairs, cache)
                    path.write_text(json.dumps(cell(model, pairs, name, args.max_exact)))
                    print(f"{model_id} {task} {name}: {path.read_text()}", flush=True)
                rows.append((model_id, task, name, json.loads(path.read_text())))
    print(table(rows))


def table(rows: list[tuple[str, str, str, dict[str, Any]]]) -> str:
    lines = [
        "| model | task (pairs, lengths) | method | CPR ↑ | CMD ↓ | cost (fwd-eq) | time (s) | curve cost (fwd-eq) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for model_id, task, name, c in rows:
        if c.get("skipped"):
            lines.append(f"| {model_id} | {task} | {name} | not run | not run | {c['cost']:,.0f} (predicted) | | |")
            continue
        what = f"{task} ({c['n_pairs']}, {'/'.join(map(str, c['lengths']))})"
        lines.append(
            f"| {model_id} | {what} | {name} | {c['cpr']:.3f} | {c['cmd']:.3f} | {c['cost']:,.0f} | "
            f"{c['seconds']:.0f} | {c['curve_cost']:,.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
