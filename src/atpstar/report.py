"""A self-contained ``report.html``: inline CSS, images embedded as base64 PNG, no external assets.

It shows what ran (model, task, direction, metric, methods and their cost in passes), the top nodes
with TransformerLens-style names and their verified exact effects, the comparison tables, the plots
and the false-negative bound when there is one. Its interactive parts (``atpstar.viewer``: the circuit
graph of edge results with a size slider, sortable and filterable tables, per-layer heatmaps with
hover details) are vanilla JavaScript inlined into the page; a content security policy forbids any fetch.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

from .evaluate.record import Evaluation
from .persist import write_text
from .result import Attribution
from .spaces import Spaces, spaces_from_info
from .viewer import CONTENT_POLICY, assets, edge_graph_json, graphs_section, heatmaps_json, heatmaps_section

TABLE_ROWS = 200  # rows of the sortable top-nodes table (at least ``top``)

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .8em 0; font-size: .88em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f0f0f0; }
td.name, th.name { text-align: left; font-family: Menlo, Consolas, monospace; }
table.facts td { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .85em; color: #555; }
.note { background: #fff8e0; border-left: 4px solid #e0b000; padding: .5em 1em; font-size: .9em; }
code { background: #f4f4f4; padding: 0 .2em; }
"""


def write_report(
    path: str | Path,
    estimates: Sequence[Attribution],
    *,
    title: str = "atpstar report",
    task: str = "",
    facts: dict[str, Any] | None = None,
    verified: Any = None,
    bound: Any = None,
    evaluations: Sequence[Evaluation] = (),
    images: Sequence[tuple[str, str | Path]] = (),
    top: int = 20,
    prompts: Sequence[tuple[str, str]] = (),
    graphs: Sequence[dict[str, Any]] | None = None,
    tokens: Sequence[str] | None = None,
    sections: Sequence[str] = (),
) -> Path:
    """Write a self-contained HTML report.

    Args:
        path: the output file (e.g. ``out/report.html``).
        estimates: results to describe; the first one gives the top-nodes table.
        title: page title.
        task: a short description of the prompt pairs (e.g. ``"ioi, 4 pairs"``).
        facts: further key/value lines for the summary table (e.g. wall time).
        verified: a verification result with ``.nodes`` [(node type, index)], ``.effects``
            [n_verified, P] and ``.cost``, or None.
        bound: a false-negative bound with ``.max_effect_upper``, ``.prob_upper``, ``.assumption``, or None.
        evaluations: cost-of-verified-recall comparisons to tabulate.
        images: (caption, PNG path) pairs embedded inline.
        top: nodes in the printed-size top table (the sortable table lists at least ``TABLE_ROWS``).
        prompts: (clean, noise) example prompt texts.
        graphs: circuit graphs to draw (the viewer's graph format, ``atpstar.viewer.check_graph``); None
            draws the first estimate's top edges when it has edge scores.
        tokens: position labels of the heatmaps (the first clean prompt's tokens).
        sections: further HTML sections, placed before the images.

    Returns:
        The path written.
    """
    parts = [f"<h1>{_e(title)}</h1>", _summary(estimates, task, facts or {}), _prompts_table(prompts)]
    if graphs is None:
        graphs = [edge_graph_json(estimates[0], verified=verified)] if _has_edges(estimates) else []
    parts += [graphs_section(graphs), *sections]
    if estimates:
        parts.append(_methods_table(estimates, verified))
        parts.append(_top_table(estimates[0], verified, max(top, TABLE_ROWS)))
        parts.append(heatmaps_section(heatmaps_json(estimates[0], verified, list(tokens) if tokens else None)))
    if verified is not None:
        parts.append(_verified_table(verified, top))
    if bound is not None:
        parts.append(_bound_section(bound))
    parts += [_evaluation_section(evaluation) for evaluation in evaluations]
    parts += [_figure(caption, Path(image)) for caption, image in images]
    path = Path(path)
    write_text(path, _page(title, "\n".join(p for p in parts if p)))
    return path


def _page(title: str, body: str) -> str:
    """The whole HTML document: content policy, styles, ``body`` and the viewer's script, all inline."""
    viewer_css, viewer_js = assets()
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>{CONTENT_POLICY}<title>{_e(title)}</title>"
        f"<style>{CSS}{viewer_css}</style></head><body>\n{body}\n<script>{viewer_js}</script>\n</body></html>\n"
    )


def _prompts_table(prompts: Sequence[tuple[str, str]]) -> str:
    if not prompts:
        return ""
    rows = "".join(f"<tr><td class='name'>{_e(c)}</td><td class='name'>{_e(n)}</td></tr>" for c, n in prompts)
    return f"<h2>Example prompts</h2><table><tr><th class='name'>clean</th><th class='name'>noise</th></tr>{rows}</table>"


def _has_edges(estimates: Sequence[Attribution]) -> bool:
    """Whether the first estimate scored edges of a MIB graph (its info keeps the graph)."""
    return bool(estimates) and "edge_graph" in estimates[0].info


def _summary(estimates: Sequence[Attribution], task: str, facts: dict[str, Any]) -> str:
    lines: dict[str, Any] = {}
    if estimates:
        first = estimates[0]
        lines["model"] = first.model_id
        lines["task"] = task or "(not given)"
        lines["prompt pairs"] = f"{first.n_pairs} (length {first.info.get('seq_len', '?')} tokens)"
        lines["direction"] = first.direction + (
            " (clean run is the base, noise activations patched in)"
            if first.direction == "noising"
            else " (noise run is the base, clean activations patched in)"
        )
        lines["metric"] = first.metric
        lines["node types"] = ", ".join(first.node_types)
        lines["nodes per pair"] = f"{sum(v[0].numel() for v in first.per_pair.values()):,}"
        lines["methods"] = ", ".join(e.method for e in estimates)
        lines["atpstar version"] = first.info.get("atpstar_version", "?")
    lines.update(facts)
    if not lines:
        return ""
    rows = "".join(f"<tr><th class='name'>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in lines.items())
    return f"<h2>Summary</h2><table class='facts'>{rows}</table>"


def _methods_table(estimates: Sequence[Attribution], verified: Any) -> str:
    rows = []
    for e in estimates:
        options = ", ".join(f"{k}={v}" for k, v in e.options.items() if v is not None and k != "checkpoint")
        rows.append(
            f"<tr><td class='name'>{_e(e.method)}</td><td class='name'>{_e(options)}</td>"
            f"<td>{e.cost.forward:.1f}</td><td>{e.cost.backward:.1f}</td><td>{e.cost.forward_equivalents:.1f}</td></tr>"
        )
    if verified is not None and getattr(verified, "cost", None) is not None:
        c = verified.cost
        rows.append(
            f"<tr><td class='name'>verification</td><td class='name'>{len(verified.nodes)} nodes</td>"
            f"<td>{c.forward:.1f}</td><td>{c.backward:.1f}</td><td>{c.forward_equivalents:.1f}</td></tr>"
        )
    head = (
        "<tr><th class='name'>method</th><th class='name'>options</th><th>forward passes</th>"
        "<th>backward passes</th><th>forward equivalents</th></tr>"
    )
    return (
        f"<h2>Methods and cost</h2><p>Passes over single prompts; a backward counts as 2 forwards; a "
        f"forward started at layer l of L counts (L − l)/L.</p><table class='sortable'>{head}{''.join(rows)}</table>"
    )


def verified_lookup(verified: Any) -> dict[tuple[str, tuple[int, ...]], torch.Tensor]:
    """(node type, index) -> [P] exact effects of a verification result."""
    effects = torch.as_tensor(verified.effects).double()
    return {(t, tuple(int(i) for i in index)): effects[row] for row, (t, index) in enumerate(verified.nodes)}


def _top_table(estimate: Attribution, verified: Any, top: int) -> str:
    lookup = verified_lookup(verified) if verified is not None else {}
    head = "<tr><th>rank</th><th class='name'>node</th><th class='name'>type</th><th>score</th>"
    head += "<th>verified effect (mean)</th><th>min</th><th>max</th></tr>" if lookup else "</tr>"
    rows = []
    for rank, node in enumerate(estimate.top(top), start=1):
        cells = (
            f"<td>{rank}</td><td class='name'>{_e(node.name)}</td><td class='name'>{node.node_type}</td>"
            f"<td>{node.score:.4g}</td>"
        )
        if lookup:
            effect = lookup.get((node.node_type, node.index))
            cells += (
                "<td>–</td><td>–</td><td>–</td>"
                if effect is None
                else f"<td>{float(effect.mean()):.4g}</td><td>{float(effect.min()):.4g}</td><td>{float(effect.max()):.4g}</td>"
            )
        rows.append(f"<tr>{cells}</tr>")
    what = "mean |estimate| over pairs" if estimate.aggregation == "mean_abs" else "mean signed effect over pairs"
    return (
        f"<h2>Top {len(rows)} nodes by {_e(estimate.method)}</h2><p>Score: {what}. Names follow TransformerLens "
        f"hook names.</p><div class='table-scroll'><table class='sortable'>{head}{''.join(rows)}</table></div>"
    )


def _verified_table(verified: Any, top: int) -> str:
    effects = torch.as_tensor(verified.effects).double()  # [n_verified, P]
    if effects.numel() == 0:
        return "<h2>Verified nodes</h2><p>No node was verified.</p>"
    mean = effects.mean(1)
    order = torch.sort(mean.abs(), descending=True, stable=True).indices[:top].tolist()
    rows = []
    names = verified.names if hasattr(verified, "names") else _names(verified.nodes, getattr(verified, "info", {}))
    for rank, row in enumerate(order, start=1):
        rows.append(
            f"<tr><td>{rank}</td><td class='name'>{_e(names[row])}</td>"
            f"<td>{row + 1}</td><td>{float(mean[row]):.4g}</td></tr>"
        )
    head = "<tr><th>rank</th><th class='name'>node</th><th>verified as</th><th>exact effect (mean over pairs)</th></tr>"
    return (
        f"<h2>Verified effects</h2><p>{len(verified.nodes)} nodes patched exactly, in estimate order; "
        f"here sorted by |exact effect|.</p><table class='sortable'>{head}{''.join(rows)}</table>"
    )


def _names(nodes: list[tuple[str, tuple[int, ...]]], info: dict[str, Any]) -> list[str]:
    """Names of ``(node type, index)`` nodes, as their node spaces (rebuilt from a result's ``info``) give them."""
    spaces = Spaces(spaces_from_info(info, list(dict.fromkeys(t for t, _ in nodes))))
    return [spaces.name(t, tuple(i)) for t, i in nodes]


def _bound_section(bound: Any) -> str:
    values = public_fields(bound)
    rows = "".join(f"<tr><th class='name'>{_e(k)}</th><td>{_e(_short(v))}</td></tr>" for k, v in values.items())
    assumption = getattr(bound, "assumption", "")
    note = f"<p class='note'>{_e(assumption)}</p>" if assumption else ""
    return f"<h2>Bound on remaining false negatives</h2><table class='facts'>{rows}</table>{note}"


def _evaluation_section(evaluation: Evaluation) -> str:
    rows = evaluation.to_rows()
    if not rows:
        return ""
    header = "".join(f"<th class='name'>{_e(h)}</th>" if h == "method" else f"<th>{_e(h)}</th>" for h in rows[0])
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class='name'>{_e(v)}</td>" if k == "method" else f"<td>{_e(_short(v))}</td>" for k, v in row.items()
        )
        + "</tr>"
        for row in rows
    )
    what = "geometric mean over single prompt pairs" if evaluation.setting == "per_pair" else "aggregate over pairs"
    return (
        f"<h2>Cost of verified recall — {evaluation.setting} ({', '.join(evaluation.node_types)})</h2>"
        f"<p>Forward passes (own cost in forward-pass equivalents + verifications) until the true top-K nodes "
        f"are verified; {what}. {_verification_unit(evaluation)} "
        f"cost/oracle: geometric mean of cost(K)/oracle(K) over log-spaced K. "
        f"{evaluation.n_nodes:,} nodes; exhaustive ground truth cost {evaluation.truth_cost:,.0f} "
        f"forward equivalents.</p><table class='sortable'><tr>{header}</tr>{body}</table>"
    )


def _verification_unit(evaluation: Any) -> str:
    """One sentence on what a verification costs in this evaluation."""
    per_pair = evaluation.setting == "per_pair"
    count = "one patched forward (this pair)" if per_pair else f"{evaluation.n_pairs} patched forwards (one per pair)"
    scale = " each counted (L - l)/L for a node at layer l" if evaluation.verification == "partial" else ""
    own = "the method's cost / P" if per_pair else "the method's whole cost"
    return f"A verification costs {count}{scale}; the method is charged {own}."


def _figure(caption: str, image: Path) -> str:
    data = base64.b64encode(image.read_bytes()).decode("ascii")
    return (
        f"<figure><img alt='{_e(caption)}' src='data:image/png;base64,{data}'>"
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def public_fields(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        items = dict(obj)
    elif is_dataclass(obj):
        items = {f.name: getattr(obj, f.name) for f in fields(obj)}
    else:
        items = {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    return {k: v for k, v in items.items() if k != "assumption" and not _bulky(v)}


def _bulky(value: Any) -> bool:
    """Tensors of more than a few numbers, or dicts of tensors: not for a summary table."""
    if isinstance(value, torch.Tensor):
        return value.numel() > 8
    if isinstance(value, dict):
        return any(isinstance(v, torch.Tensor) for v in value.values())
    return False


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
