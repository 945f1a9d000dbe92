"""Interactive views inside ``report.html``: a circuit graph with a size slider, sortable and filterable
tables, and per-layer heatmaps with hover details. Vanilla JavaScript and SVG (``viewer.js``, package
data) inlined into the page: the report stays one file that fetches nothing.

The graph data is a documented JSON shape (``page``'s docstring; ``check_graph`` checks it), so any
graph with layered nodes and weighted edges (e.g. a feature circuit of dictionary latents) draws.
"""

from __future__ import annotations

from .circuit import MAX_DRAWN, edge_graph_json
from .heatmaps import heatmaps_json
from .page import CONTENT_POLICY, FORMAT, assets, check_graph, embed_json, graphs_section, heatmaps_section

__all__ = [
    "CONTENT_POLICY",
    "FORMAT",
    "MAX_DRAWN",
    "assets",
    "check_graph",
    "edge_graph_json",
    "embed_json",
    "graphs_section",
    "heatmaps_section",
    "heatmaps_json",
]
