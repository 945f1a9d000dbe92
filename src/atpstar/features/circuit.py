"""Feature circuits: the top latents of each dictionary and the edges between them, as a graph.

``feature_circuit(model, pairs, dictionaries, k=...)`` keeps, per dictionary, the ``k`` (latent, position)
nodes of largest |effect| on the metric (mean over pairs), then weighs every edge between kept latents of
consecutive dictionaries (in forward order) and from the last dictionary's kept latents to the metric
(``features.latent_edges``: exact path patching, or its AtP estimate). The result exports as JSON (the
shape below, read by report viewers; ``docs/design/0018-feature-circuits.md``)::

    {"format": "atpstar.feature_circuit", "version": 1, "model": ..., "metric": ..., "direction": ...,
     "method": "atp" | "exact", "n_pairs": P, "k": k,
     "dictionaries": [{"name", "id", "hook", "layer", "d_sae", "content_hash"}, ...],   # forward order
     "nodes": [{"id": "blocks.6.hook_resid_post/sae-1k[latent 12, pos 5]", "dictionary": id, "hook",
                "layer", "index", "position", "score"}, ...,
               {"id": "metric", "dictionary": null, ..., "score": mean base metric}],
     "edges": [{"source": node id, "target": node id or "metric", "weight": mean effect}, ...]}

Scores and weights are means over pairs of per-pair effects (direction ``noising``: what patching the
noise prompt's value in changes). Nodes are ranked by AtP (``method="atp"``) or exactly among the
``candidates`` AtP ranks highest (``method="exact"``).

Shape letters: P pairs, T positions, S latents, U upstream and N downstream nodes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..cost import Cost
from ..dictionaries.sites import check_fits
from ..errors import InputError
from ..job import Job
from ..model import as_model
from ..pairs import PromptPairs, check_direction
from .latent_edges import (
    Captured,
    capture,
    exact_latent_edges,
    exact_metric_edges,
    in_forward_order,
    latent_edges_atp,
    metric_edges_atp,
)

FORMAT = "atpstar.feature_circuit"
METRIC = "metric"
METHODS = ("atp", "exact")


@dataclass
class FeatureCircuit:
    """A feature circuit: kept latents per dictionary and weighted edges (see the module docstring).

    Attributes:
        data: the JSON document.
        cost: passes the computation ran.
    """

    data: dict[str, Any]
    cost: Cost = field(default_factory=Cost)

    @property
    def nodes(self) -> list[dict[str, Any]]:
        return list(self.data["nodes"])

    @property
    def edges(self) -> list[dict[str, Any]]:
        return list(self.data["edges"])

    def top_edges(self, n: int) -> list[dict[str, Any]]:
        """The ``n`` edges of largest |weight|."""
        return sorted(self.edges, key=lambda e: -abs(e["weight"]))[:n]

    def to_json(self) -> str:
        return json.dumps(self.data, indent=1)

    def save(self, path: str | Path) -> Path:
        """Write the JSON document; returns the path."""
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureCircuit:
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise InputError(f"{path} is not a feature circuit (format {data.get('format')!r}, expected {FORMAT!r})")
        return cls(data)


def feature_circuit(
    model: Any,
    pairs: PromptPairs,
    dictionaries: Sequence[Any],
    *,
    k: int = 10,
    method: str = "atp",
    direction: str = "noising",
    candidates: int | None = None,
) -> FeatureCircuit:
    """The top-``k`` latents of each dictionary and the edges between them.

    Args:
        model: an ``atpstar.Model`` (or a ``transformers`` model).
        pairs: prompt pairs of one length.
        dictionaries: SAEs (``atpstar.load_dictionary``), at least one; taken in forward order.
        k: latents (with their positions) kept per dictionary.
        method: ``"atp"`` (node scores and edge weights by attribution patching) or ``"exact"``
            (nodes ranked and edges weighed by exact patching).
        direction: ``"noising"`` or ``"denoising"``.
        candidates: with ``method="exact"``, how many AtP-ranked nodes per dictionary are patched
            exactly to choose the top ``k`` (default ``4 * k``).

    Returns:
        A ``FeatureCircuit``; ``.save(path)`` writes its JSON.

    Raises:
        InputError: no dictionaries, a transcoder, a dictionary that does not fit the model, a bad
            ``k``/``method``/``direction``.
    """
    if method not in METHODS:
        raise InputError(f"unknown feature-circuit method {method!r}; choose one of {list(METHODS)}")
    if not isinstance(k, int) or k < 1:
        raise InputError(f"k must be a positive integer (latents kept per dictionary); got {k!r}")
    if not dictionaries:
        raise InputError("feature_circuit needs at least one dictionary (atpstar.load_dictionary)")
    check_direction(direction)
    job = Job(as_model(model), pairs, direction, Cost())
    for dictionary in dictionaries:
        check_fits(dictionary, job.model)
    ordered = in_forward_order(dictionaries)
    captured = capture(job, ordered)
    kept = [_top_nodes(job, captured, ordered, i, k, method, candidates) for i in range(len(ordered))]
    edges: list[dict[str, Any]] = []
    for i in range(len(ordered) - 1):
        estimate = exact_latent_edges if method == "exact" else latent_edges_atp
        weights = estimate(job, captured, ordered, i, kept[i][0], kept[i + 1][0]).mean(-1)  # [U, N]
        edges += _edge_rows(ordered, i, kept[i][0], i + 1, kept[i + 1][0], weights)
    last = len(ordered) - 1
    edges += [{"source": _node_id(ordered[last], int(n[0]), int(n[1])), "target": METRIC, "weight": float(s)}
              for n, s in zip(kept[last][0], kept[last][1])]  # fmt: skip
    data = _document(job, ordered, kept, edges, method, k, captured)
    return FeatureCircuit(data, job.cost)


def _top_nodes(
    job: Job, captured: Captured, ordered: Sequence[Any], index: int, k: int, method: str, candidates: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(nodes [k, 2] as (latent, pos), mean effects [k]) of dictionary ``index``."""
    delta = captured.delta[index]  # [P, T, S]
    n_pos, n_latents = delta.shape[1], delta.shape[2]
    everything = torch.stack(torch.meshgrid(torch.arange(n_latents), torch.arange(n_pos), indexing="ij"), -1)
    everything = everything.reshape(-1, 2)  # [S*T, 2] (latent, pos)
    live = everything[delta.abs().amax(0).T.reshape(-1) > 0]  # only latents that change can have effects
    if len(live) == 0:
        return torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
    scores = metric_edges_atp(captured, ordered[index], index, live).mean(-1).double()  # [n_live]
    if method == "exact":
        pool = scores.abs().topk(min(candidates or 4 * k, len(live))).indices
        live, scores = live[pool], exact_metric_edges(job, captured, ordered, index, live[pool]).mean(-1)
    top = scores.abs().topk(min(k, len(live))).indices
    return live[top], scores[top]


def _node_id(dictionary: Any, latent: int, pos: int) -> str:
    return f"{dictionary.hook}/{dictionary.name}[latent {latent}, pos {pos}]"


def _edge_rows(
    ordered: Sequence[Any], up: int, up_nodes: torch.Tensor, down: int, down_nodes: torch.Tensor, weights: torch.Tensor
) -> list[dict[str, Any]]:
    rows = []
    for u, (latent, pos) in enumerate(up_nodes.tolist()):
        for n, (latent2, pos2) in enumerate(down_nodes.tolist()):
            source, target = _node_id(ordered[up], latent, pos), _node_id(ordered[down], latent2, pos2)
            rows.append({"source": source, "target": target, "weight": float(weights[u, n])})
    return rows


def _document(
    job: Job, ordered: Sequence[Any], kept: list[tuple[torch.Tensor, torch.Tensor]], edges: list[dict[str, Any]],
    method: str, k: int, captured: Captured,
) -> dict[str, Any]:  # fmt: skip
    dictionaries = [{"name": d.name, "id": getattr(d, "id", d.name), "hook": d.hook, "layer": int(d.layer),
                     "d_sae": int(d.W_dec.shape[0]), "content_hash": getattr(d, "content_hash", "")}
                    for d in ordered]  # fmt: skip
    nodes = []
    for d, (index, scores) in zip(ordered, kept):
        for (latent, pos), score in zip(index.tolist(), scores.tolist()):
            nodes.append({"id": _node_id(d, latent, pos), "dictionary": getattr(d, "id", d.name), "hook": d.hook,
                          "layer": int(d.layer), "index": latent, "position": pos, "score": score})  # fmt: skip
    metric = float(captured.base_metric.double().mean())
    nodes.append({"id": METRIC, "dictionary": None, "hook": None, "layer": None, "index": None, "position": None,
                  "score": metric})  # fmt: skip
    return {
        "format": FORMAT, "version": 1, "model": job.model.model_id, "metric": job.pairs.metric_name,
        "direction": job.direction, "method": method, "n_pairs": job.n_pairs, "k": k,
        "dictionaries": dictionaries, "nodes": nodes, "edges": edges,
    }  # fmt: skip
