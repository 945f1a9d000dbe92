"""Faithfulness plots, tables and the report section of ``atpstar circuit``."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .circuits import FaithfulnessCurve


def curve_table(curves: Sequence[FaithfulnessCurve], costs: dict[str, Any] | None = None) -> str:
    """Markdown table: method, CPR, CMD, f at each size, and the cost of its scores."""
    costs = costs or {}
    fractions = curves[0].fractions if curves else []
    head = "| method | CPR ↑ | CMD ↓ | " + " | ".join(f"f@{x:g}" for x in fractions) + " | cost (fwd-eq) |"
    rule = "|" + "---|" * (4 + len(fractions))
    rows = [head, rule]
    for c in curves:
        cost = costs.get(c.method)
        cells = " | ".join(f"{f:.3f}" for f in c.faithfulness)
        rows.append(f"| {c.method} | {c.cpr:.4f} | {c.cmd:.4f} | {cells} | {'' if cost is None else f'{cost:.1f}'} |")
    return "\n".join(rows)


def plot_curves(curves: Sequence[FaithfulnessCurve], path: str | Path, title: str = "") -> Path:
    """f against circuit size (fraction of edges, log scale): per method the signed ranking (CPR) and,
    dotted, the |score| ranking (CMD)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for c in curves:
        line = ax.plot(c.fractions, c.faithfulness, marker="o", label=f"{c.method} signed (CPR {c.cpr:.3f})")[0]
        if c.faithfulness_abs:  # MIB's CMD ranks by |score|
            ax.plot(
                c.fractions,
                c.faithfulness_abs,
                marker="x",
                linestyle=":",
                color=line.get_color(),
                label=f"{c.method} |score| (CMD {c.cmd:.3f})",
            )
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xscale("log")
    ax.set_xlabel("circuit size (fraction of edges)")
    ax.set_ylabel("faithfulness f")
    ax.set_title(title or "faithfulness of top circuits (MIB's rankings)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    from ..persist import atomic_path

    with atomic_path(path) as tmp:  # an interrupted save leaves no torn image
        fig.savefig(tmp, format=Path(path).suffix[1:] or "png", dpi=120)
    plt.close(fig)
    return Path(path)


def curve_html_table(curves: Sequence[FaithfulnessCurve], costs: dict[str, Any] | None = None) -> str:
    """HTML section: the table of ``curve_table`` as a sortable table, with what CPR and CMD mean."""
    costs = costs or {}
    fractions = curves[0].fractions if curves else []
    head = "".join(f"<th>{h}</th>" for h in ["CPR ↑", "CMD ↓", *(f"f@{x:g}" for x in fractions), "cost (fwd-eq)"])
    rows = []
    for c in curves:
        cost = costs.get(c.method)
        cells = [f"{c.cpr:.4f}", f"{c.cmd:.4f}", *(f"{f:.3f}" for f in c.faithfulness), "" if cost is None else f"{cost:.1f}"]
        rows.append(f"<tr><td class='name'>{html.escape(c.method)}</td>" + "".join(f"<td>{v}</td>" for v in cells) + "</tr>")
    return (
        "<h2>Faithfulness of the circuits (MIB)</h2><p>f = (m(C) − m(∅)) / (m(M) − m(∅)) of the top-|score| "
        "circuit at each size (fraction of all edges); CPR is the area under f (higher is better), CMD the area "
        f"between f and 1 (lower is better).</p><table class='sortable'><tr><th class='name'>method</th>{head}</tr>"
        f"{''.join(rows)}</table>"
    )
