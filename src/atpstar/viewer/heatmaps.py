"""Data of the interactive per-layer heatmaps: for each node type with a layer and a position axis, the
maps layer × unit (heads, summed over positions) and layer × position (summed over units), each cell
with its Σ|score|, its strongest node (name, score, exact effect if verified) and the verified nodes in it.

Shape letters: L layers, K the kept axis (heads or positions), R the axes summed over.
"""

from __future__ import annotations

from typing import Any

import torch

from .page import json_number as _number

MAX_CELLS = 20000  # per map; a larger map (e.g. layer × position over long prompts) is left out


def heatmaps_json(estimate: Any, verified: Any = None, tokens: list[str] | None = None) -> list[dict[str, Any]]:
    """The heatmaps of a node result (none for node types without a layer and a position axis).

    Args:
        estimate: an ``Attribution``.
        verified: a verification of some of its nodes, or None.
        tokens: labels of the positions (the first clean prompt's tokens), or None.

    Returns:
        One dict per map: ``node_type``, ``title``, ``rows`` (layer labels), ``columns`` (labels),
        ``values`` [L][K] Σ|score|, ``top`` [L][K] (name, score, exact or None) of the strongest node,
        and ``verified`` [L][K] (count, Σ exact effect) of the verified nodes in the cell.
    """
    spaces = estimate.spaces()
    exact = _exact_nodes(verified)
    maps = []
    for node_type in estimate.node_types:
        axes = spaces.of(node_type).axes(node_type)
        if "layer" not in axes or "pos" not in axes:
            continue
        units = [i for i, axis in enumerate(axes) if axis not in ("layer", "pos")]
        kept = [i for i in units if axes[i] != "index"] + [axes.index("pos")]  # neurons are too many for a map
        for keep in kept:
            found = _map(estimate, spaces, exact, node_type, axes, keep, tokens)
            if found is not None:
                maps.append(found)
    return maps


def _map(
    estimate: Any, spaces: Any, exact: dict[Any, float | None], node_type: str, axes: tuple[str, ...], keep: int, tokens: Any
) -> dict[str, Any] | None:
    scores = estimate.scores[node_type].double()
    layer = axes.index("layer")
    rest = [i for i in range(len(axes)) if i not in (layer, keep)]
    moved = scores.permute(layer, keep, *rest)  # [L, K, *R]
    n_layers, n_kept = moved.shape[0], moved.shape[1]
    if n_layers * n_kept > MAX_CELLS:
        return None
    flat = moved.reshape(n_layers, n_kept, -1)  # [L, K, *R] -> [L, K, R]
    values = flat.abs().sum(2)  # [L, K]
    best = flat.abs().argmax(2)  # [L, K]
    rest_shape = [moved.shape[2 + j] for j in range(len(rest))]
    cells: dict[tuple[int, int], list[float | None]] = {}  # (layer, kept index) -> exact effects verified there
    for (t, index), value in exact.items():
        if t == node_type:
            cells.setdefault((index[layer], index[keep]), []).append(value)
    top, counts = [], []
    for row in range(n_layers):
        top_row, count_row = [], []
        for col in range(n_kept):
            index = _full_index(axes, layer, keep, rest, rest_shape, row, col, int(best[row, col]))
            top_row.append([spaces.name(node_type, index), _number(estimate.scores[node_type][index]),
                            exact.get((node_type, index))])  # fmt: skip
            count_row.append(_cell_verified(cells.get((row, col), [])))
        top.append(top_row)
        counts.append(count_row)
    return {
        "node_type": node_type,
        "title": f"{node_type}: Σ|score| by layer × {axes[keep]}",
        "column_axis": axes[keep],
        "rows": [f"layer {i}" for i in range(n_layers)],
        "columns": _labels(axes[keep], n_kept, tokens),
        "values": [[_number(v) for v in row] for row in values.tolist()],
        "top": top,
        "verified": counts,
    }


def _full_index(
    axes: tuple[str, ...], layer: int, keep: int, rest: list[int], rest_shape: list[int], row: int, col: int, flat: int
) -> tuple[int, ...]:
    """The node index (in the node type's own axis order) of entry ``flat`` of cell (row, col)."""
    index = [0] * len(axes)
    index[layer], index[keep] = row, col
    for axis, size in zip(reversed(rest), reversed(rest_shape)):
        index[axis] = flat % size
        flat //= size
    return tuple(index)


def _cell_verified(found: list[float | None]) -> list[Any]:
    """[count, Σ exact effect] of the verified nodes of a cell ([0, None] when none is)."""
    total = sum(v for v in found if v is not None)
    return [len(found), _number(total) if found else None]


def _labels(axis: str, size: int, tokens: Any) -> list[str]:
    if axis == "pos":
        if tokens is not None and len(tokens) == size:
            return [f"pos {i} {tok!r}" for i, tok in enumerate(tokens)]
        return [f"pos {i}" for i in range(size)]
    return [f"{axis} {i}" for i in range(size)]


def _exact_nodes(verified: Any) -> dict[tuple[str, tuple[int, ...]], float | None]:
    if verified is None:
        return {}
    effects = torch.as_tensor(verified.effects).double()  # [n_verified, P]
    return {(t, tuple(int(i) for i in index)): _number(effects[row].mean()) for row, (t, index) in enumerate(verified.nodes)}
