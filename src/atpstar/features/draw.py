"""Drawing a feature circuit: an SVG of its JSON, and the report.html section that carries both.

Layout: one row per dictionary (forward order, the first at the bottom) and the metric on top; within a
row, nodes sorted by position. A node's radius grows with |score|, an edge's width with |weight|; blue is
positive, red negative. ``circuit_section`` also embeds the JSON document itself
(``<script type="application/json" class="atpstar-feature-circuit">``), so an interactive viewer in the
report can read it without a second file.
"""

from __future__ import annotations

import html
import json
from typing import Any

WIDTH, ROW, MARGIN = 900, 90, 40


def _colour(value: float) -> str:
    return "#2b6cb0" if value >= 0 else "#c53030"


def _positions(data: dict[str, Any]) -> dict[str, tuple[float, float]]:
    rows = [d["id"] for d in data["dictionaries"]]
    height = ROW * (len(rows) + 1) + 2 * MARGIN
    where: dict[str, tuple[float, float]] = {}
    for r, dictionary in enumerate(rows):
        nodes = sorted(
            (n for n in data["nodes"] if n["dictionary"] == dictionary), key=lambda n: (n["position"], n["index"])
        )
        y = height - MARGIN - ROW * r - ROW / 2
        for i, node in enumerate(nodes):
            where[node["id"]] = (MARGIN + (i + 0.5) * (WIDTH - 2 * MARGIN) / max(len(nodes), 1), y)
    where["metric"] = (WIDTH / 2, MARGIN + ROW / 2)
    return where


def circuit_svg(data: dict[str, Any]) -> str:
    """An SVG drawing of a feature circuit's JSON document (``FeatureCircuit.data``)."""
    where = _positions(data)
    height = ROW * (len(data["dictionaries"]) + 1) + 2 * MARGIN
    top_weight = max((abs(e["weight"]) for e in data["edges"]), default=1.0) or 1.0
    top_score = max((abs(n["score"]) for n in data["nodes"] if n["id"] != "metric"), default=1.0) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-size="10">']
    for edge in data["edges"]:
        (x1, y1), (x2, y2) = where[edge["source"]], where[edge["target"]]
        width = 0.3 + 4 * abs(edge["weight"]) / top_weight
        parts.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{_colour(edge["weight"])}" '
                     f'stroke-width="{width:.2f}" opacity="0.6"><title>{html.escape(edge["source"])} → '
                     f'{html.escape(edge["target"])}: {edge["weight"]:.4g}</title></line>')  # fmt: skip
    for node in data["nodes"]:
        x, y = where[node["id"]]
        if node["id"] == "metric":
            parts.append(f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="middle">metric ({node["score"]:.3g})</text>')
            continue
        radius = 3 + 9 * abs(node["score"]) / top_score
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{radius:.1f}" fill="{_colour(node["score"])}">'
                     f'<title>{html.escape(node["id"])}: {node["score"]:.4g}</title></circle>'
                     f'<text x="{x:.1f}" y="{y + radius + 10:.1f}" text-anchor="middle">{node["index"]}@{node["position"]}'
                     '</text>')  # fmt: skip
    for r, dictionary in enumerate(data["dictionaries"]):
        y = height - MARGIN - ROW * r - ROW / 2
        parts.append(
            f'<text x="4" y="{y - 14:.1f}">{html.escape(dictionary["hook"])}/{html.escape(dictionary["name"])}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def circuit_section(data: dict[str, Any], title: str = "Feature circuit") -> str:
    """An HTML section for report.html: a heading, the SVG, and the JSON document for viewers."""
    document = json.dumps(data).replace("</", "<\\/")  # keep the JSON from closing its script element
    return (
        f'<section class="feature-circuit"><h2>{html.escape(title)}</h2>\n'
        f"<p>{len(data['nodes']) - 1} latents of {len(data['dictionaries'])} dictionaries, {len(data['edges'])} edges "
        f"({html.escape(data['method'])}, {html.escape(data['direction'])}, mean over {data['n_pairs']} pairs). "
        "Node label: latent@position.</p>\n"
        f"{circuit_svg(data)}\n"
        f'<script type="application/json" class="atpstar-feature-circuit">{document}</script>\n</section>'
    )


def write_html(data: dict[str, Any], path: Any) -> Any:
    """A standalone page with ``circuit_section``; returns the path."""
    from pathlib import Path

    page = f"<!doctype html><html><head><meta charset='utf-8'><title>atpstar feature circuit</title></head><body>\n{circuit_section(data)}\n</body></html>\n"
    Path(path).write_text(page)
    return path
