"""The viewer's graph format, its check, and the HTML that embeds graphs, heatmaps and the viewer's script.

Graph format (``"format": "atpstar-graph"``, ``"version": 1``), a JSON object:

- ``nodes``: list of objects; each has ``layer`` (a number: rows are drawn bottom to top by layer; null
  or absent: the output row on top, e.g. the metric) and may have ``id`` (default: its position in the
  list), ``name`` (default: a string ``id``, else built from ``dictionary``, ``index`` and ``position``),
  ``score``, ``exact``, ``kind``, ``dictionary``,
  ``index``, ``position``, and ``x`` (its place across the row, 0 to 1; default: the row's nodes
  spread evenly in list order).
- ``edges``: list of objects with ``source`` and ``target`` (a node's ``id``, or its position in
  ``nodes``) and ``weight`` (or ``score``); optional ``exact``, ``name``, ``kind``.
- ``circuits`` (optional): list of ``{"fraction", "n_edges", "faithfulness" (or null), "edges": [positions
  in edges]}`` for the size slider; without it the viewer makes one circuit per MIB fraction of the given
  edges, the largest |weight| first.
- ``title``, ``meta`` (key -> value shown above the graph), ``score_label`` (optional).

A feature circuit of dictionary latents is such a graph: nodes with ``dictionary``, ``layer``,
``index``, ``position`` and ``score``, edges with ``weight``.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from importlib import resources
from typing import Any

from ..errors import InputError

FORMAT = "atpstar-graph"


def json_number(value: Any) -> float | None:
    """A float for JSON (None for NaN or infinity, which JSON cannot hold)."""
    number = float(value)
    return number if math.isfinite(number) else None


def check_graph(graph: Any) -> dict[str, Any]:
    """``graph`` after checking it has the viewer's graph format (see the module docstring).

    Raises:
        InputError: not an object, no node list, a node whose layer is not a number (or null), an edge without
            source, target or a numeric weight, or an edge naming a node that is not there.
    """
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        raise InputError("a viewer graph must be a JSON object with a 'nodes' list and an 'edges' list")
    ids = set()
    for i, node in enumerate(graph["nodes"]):
        if not isinstance(node, dict) or not (node.get("layer") is None or _is_number(node["layer"])):
            raise InputError(
                f"graph node {i} needs a numeric 'layer' (rows are drawn by layer; null for an output); got {node!r}"
            )
        ids.add(node.get("id", i))
    for i, edge in enumerate(graph.get("edges", [])):
        weight = edge.get("weight", edge.get("score")) if isinstance(edge, dict) else None
        if not isinstance(edge, dict) or not (weight is None or _is_number(weight)):
            raise InputError(f"graph edge {i} needs 'source', 'target' and a numeric 'weight'; got {edge!r}")
        missing = [end for end in ("source", "target") if edge.get(end) not in ids]
        if missing:
            raise InputError(
                f"graph edge {i} names {', '.join(repr(edge.get(m)) for m in missing)}, which is no node's 'id' "
                "(or position in 'nodes'); give every node an 'id' and refer to it"
            )
    return graph


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def embed_json(element_id: str, data: Any) -> str:
    """A ``<script type="application/json">`` element holding ``data`` (safe inside HTML)."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return f"<script type='application/json' id='{html.escape(element_id, quote=True)}'>{text}</script>"


def graphs_section(graphs: Sequence[dict[str, Any]], heading: str = "Circuit viewer") -> str:
    """HTML of one interactive graph per item of ``graphs`` (each checked against the graph format)."""
    if not graphs:
        return ""
    parts = [
        f"<h2>{html.escape(heading)}</h2><p>Nodes by layer (input at the bottom, logits on top); edge width and "
        "colour by score (blue positive, red negative; a dark outline marks edges whose exact effect was "
        "verified). Move the slider to change the circuit size; click a node or an edge for its details.</p>"
    ]
    for i, graph in enumerate(graphs):
        check_graph(graph)
        parts.append(f"<div class='atp-graph' data-source='atp-graph-{i}'></div>{embed_json(f'atp-graph-{i}', graph)}")
    return "\n".join(parts)


def heatmaps_section(maps: Sequence[dict[str, Any]]) -> str:
    """HTML of the interactive per-layer heatmaps (hover a cell for its nodes)."""
    if not maps:
        return ""
    return (
        "<h2>Per-layer heatmaps</h2><p>Σ|score| per cell; hover a cell for the strongest node in it (name, "
        "score, exact effect where verified) and the verified nodes it holds.</p>"
        f"<div class='atp-heatmaps' data-source='atp-heatmaps'></div>{embed_json('atp-heatmaps', list(maps))}"
    )


def assets() -> tuple[str, str]:
    """(CSS, JavaScript) of the viewer, read from the package data."""
    folder = resources.files("atpstar.viewer")
    return folder.joinpath("viewer.css").read_text(encoding="utf-8"), folder.joinpath("viewer.js").read_text(
        encoding="utf-8"
    )


# Nothing may be fetched: scripts and styles only inline, images only as data: URLs, no connections.
CONTENT_POLICY = (
    "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; img-src data:\">"
)
