"""``atpstar circuit``: edge scores by several methods, MIB circuit files, faithfulness curves and CPR/CMD."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..persist import write_text
from .args import command, outputs
from .common import check_methods, load_model, load_task, out_dir, run_method, say

CIRCUIT_DEFAULT = "atp,atp+ig,atp*"


def add_circuit_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    circuit = command(
        sub,
        "circuit",
        "edge scores, MIB circuit files and faithfulness (CPR/CMD) per method",
        "Score every edge of the MIB/EAP-IG graph with each method, write MIB circuit files "
        "(OUT/<method>.mib.json, every edge with its score), the circuits at MIB's sizes "
        "(OUT/<method>.circuits.json), the faithfulness curve with CPR and CMD "
        "(OUT/<method>.faithfulness.json), a table, a plot and report.html.",
    )
    circuit.add_argument(
        "--method",
        default=CIRCUIT_DEFAULT,
        help=f"comma list of edge methods: activation_patching, atp, atp+qkfix, atp+graddrop, atp*, atp+ig "
        f"(default {CIRCUIT_DEFAULT})",
    )
    circuit.add_argument(
        "--option", action="append", default=[], metavar="[METHOD:]KEY=VALUE", help="a method option, repeatable"
    )
    circuit.add_argument(
        "--fractions",
        default=None,
        help="comma list of circuit sizes as fractions of all edges (default MIB's 0.001,...,1)",
    )
    circuit.add_argument("--no-prune", action="store_true", help="do not prune circuits as MIB does")
    outputs(circuit, "out/circuit", workers=False)


def cmd_circuit(args: argparse.Namespace) -> int:
    from ..edges.circuits import MIB_FRACTIONS, check_fractions, faithfulness_curve, signed_importance, top_edges
    from ..edges.report import curve_table
    from ..viewer import edge_graph_json

    start = time.monotonic()
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    options = check_methods(args, methods, ["edge"])  # bad ids, options or no edge form: before the model loads
    given = [x.strip() for x in args.fractions.split(",")] if args.fractions else list(MIB_FRACTIONS)
    fractions = check_fractions(given, "--fractions")  # NaN, inf, out of range or order: before the model loads
    out = out_dir(args)
    model = load_model(args)
    pairs, task = load_task(model, args)
    curves: list[Any] = []
    costs: dict[str, float] = {}
    results: list[Any] = []
    graphs: list[dict[str, Any]] = []
    for method in methods:
        # MIB files are written: MIB's head senders on post-norm models unless asked otherwise (0019)
        method_options = {"edge_convention": "mib", **options[method]}
        result = run_method(model, pairs, method, ["edge"], method_options, args)
        name = method.replace("*", "_star").replace("+", "_")
        result.save(out / f"{name}.edges")
        result.to_mib(out / f"{name}.mib.json", convention=method_options["edge_convention"])
        graph = result.edge_graph()
        names = graph.edge_names
        circuits = {}
        for x in fractions:
            # MIB's signed ranking (its CPR circuits, 0019)
            chosen = top_edges(graph, signed_importance(result), int(x * graph.n_edges), not args.no_prune, False)
            circuits[f"{x:g}"] = [names[i] for i in chosen.nonzero()[:, 0].tolist()]
        write_text(out / f"{name}.circuits.json", json.dumps(circuits))
        say(f"{method}: faithfulness at {len(fractions)} circuit sizes")
        curve = faithfulness_curve(
            model,
            pairs,
            result,
            fractions,
            direction=args.direction,
            prune=not args.no_prune,
            progress=not args.no_progress,
        )
        curve.save(out / f"{name}.faithfulness.json")
        curves.append(curve)
        costs[method] = result.cost.forward_equivalents
        results.append(result)
        graphs.append(edge_graph_json(result, curve=curve, prune=not args.no_prune, title=f"{method}: circuits"))
    table = curve_table(curves, costs)
    write_text(out / "circuit_table.md", f"{task}\n\n{table}\n")
    print(table)
    _report(args, out, model.model_id, task, results, curves, costs, graphs, start)
    say(f"wrote {out}/ in {time.monotonic() - start:.1f} s")
    return 0


def _report(
    args: argparse.Namespace,
    out: Path,
    model_id: str,
    task: str,
    results: list[Any],
    curves: list[Any],
    costs: dict[str, float],
    graphs: list[dict[str, Any]],
    start: float,
) -> None:
    """report.html: the estimates' tables, one circuit graph per method, the faithfulness table and plot."""
    from ..edges.report import curve_html_table, plot_curves
    from ..report import write_report

    images = []
    if not args.no_plots:
        images.append(("faithfulness by circuit size", plot_curves(curves, out / "faithfulness.png", f"{model_id}: {task}")))
    write_report(
        out / "report.html",
        results,
        title="atpstar circuit",
        task=task,
        facts={"total wall time": f"{time.monotonic() - start:.1f} s"},
        graphs=graphs,
        sections=[curve_html_table(curves, costs)],
        images=images,
        top=args.top,
    )
