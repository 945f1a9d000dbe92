"""Edges of the MIB/EAP-IG graph as a node space (``nodes=["edge"]``).

The head-sender convention of post-norm models (``EdgeGraph.convention``, 0019) is the space's: bound
from the method option ``edge_convention`` and kept in ``info["edge_graph"]``.

One node type, ``edge``: per pair [N] in the order of ``edge_names(model)``, or [N, T] when a method
runs with ``edge_positions=True`` (edge n at the sender's residual position t). Names are MIB's
(``a0.h1->m1``, ``a0.h1->m1[pos 3]``). A saved result keeps the graph (``info["edge_graph"]``), so its
edges can be named without the model. Exact patching of one edge: one forward per pair started at
the receiver's layer (``edges.patching``); its cost share is ``EdgeGraph.patch_share``.

Shape letters: N edges, P pairs, T positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from ..edges.graph import EdgeGraph, check_convention, edge_node_name, graph_of
from ..edges.patching import edge_bytes, patch_edges, prepare_edges
from ..edges.sites import check_edges_supported
from ..errors import InputError
from .base import Advance, NodeSpace, register_space

EDGE = "edge"


@register_space
class EdgeNodes(NodeSpace):
    """The edges of a model's MIB/EAP-IG graph.

    Attributes:
        graph: the edge graph.
        positions: per-position edges ([N, T] per pair) rather than position-summed ([N]).
        d_model: the model width (MIB's file header needs it).
    """

    kind: ClassVar[str] = "edges"
    engine: ClassVar[str] = "edges"

    def __init__(self, graph: EdgeGraph, positions: bool = False, d_model: int = 0) -> None:
        super().__init__((EDGE,))
        self.graph, self.positions, self.d_model = graph, positions, d_model

    @classmethod
    def owns(cls, node_type: str) -> bool:
        return node_type == EDGE

    @classmethod
    def known_types(cls) -> tuple[str, ...]:
        return (EDGE,)

    @classmethod
    def bind(cls, model: Any, node_types: Sequence[str], options: Mapping[str, Any]) -> NodeSpace:
        convention = options.get("edge_convention", "atpstar")
        check_convention(convention)
        return cls(graph_of(model, convention), bool(options.get("edge_positions", False)), int(model.d_model))

    @classmethod
    def from_info(cls, info: Mapping[str, Any], node_types: Sequence[str]) -> NodeSpace:
        if "edge_graph" not in info:
            raise InputError("this result has no edge graph; run attribute(..., nodes=['edge'])")
        description = dict(info["edge_graph"])
        positions = bool(info.get("edge_positions", False))
        return cls(EdgeGraph.from_description(description), positions, int(description.get("d_model", 0)))

    def axes(self, node_type: str) -> tuple[str, ...]:
        return ("index", "pos") if self.positions else ("index",)

    def shape(self, node_type: str, seq_len: int) -> tuple[int, ...]:
        return (self.graph.n_edges, seq_len) if self.positions else (self.graph.n_edges,)

    def name(self, node_type: str, index: tuple[int, ...]) -> str:
        return edge_node_name(self.graph.edge_names, index)

    def columns(self, node_type: str, index: tuple[int, ...]) -> dict[str, int]:
        return {"index": index[0]} if len(index) == 1 else {"index": index[0], "pos": index[1]}

    def patch_share(self, node_type: str, seq_len: int, charged: bool = False) -> torch.Tensor:
        # EdgeGraph.patch_share charges a logits receiver 1 / L; the engine counts its unembedding as free.
        share = self.graph.patch_share()  # [N], by the receiver's layer (a q/k/v receiver adds 1 / L)
        if not charged:
            share = torch.where(self.graph.receiver_index == self.graph.logits_receiver, 0.0, share)
        return share[:, None].expand(-1, seq_len) if self.positions else share  # [N(, T)]

    def describe(self) -> dict[str, Any]:
        return {**self.graph.describe(), "d_model": self.d_model}

    def check_layout(self, node_type: str, scores: torch.Tensor, seq_len: int) -> None:
        if scores.shape[0] != self.graph.n_edges or scores.ndim > 2:
            raise InputError(
                f"edge scores of shape {tuple(scores.shape)} do not fit this model's edge graph "
                f"({self.graph.n_edges} edges); use the model the result was made for"
            )

    def check_model(self, model: Any) -> None:
        check_edges_supported(model)

    def attribute(
        self, method: Any, job: Any
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        per_pair, extras, info = method._attribute_edges(job.model, job.pairs, job.direction, job.cost, job.progress)
        named = {f"{name}/{EDGE}": value for name, value in extras.items()}  # [P, ...] each
        return {EDGE: per_pair}, named, {**info, "edge_graph": self.describe()}

    def element_bytes(self, job: Any) -> int:
        return int(edge_bytes(job.model, job.seq_len))

    def pair_bytes(self, job: Any) -> int:
        """``prepare_edges``' cache: residual streams and MLP inputs of every layer, senders and their deltas."""
        sizes = job.model.sizes
        vectors = 2 * sizes.n_layers + 1 + 2 * self.graph.n_senders  # [T, D] each
        return vectors * job.seq_len * sizes.d_model * torch.finfo(job.model.dtype).bits // 8

    def exact_effects(
        self, job: Any, nodes: list[tuple[str, tuple[int, ...]]], batch: int | None, advance: Advance | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model, pairs = job.model, job.pairs
        index = torch.tensor([i for _, i in nodes], dtype=torch.long).reshape(len(nodes), -1)  # [n, 1 or 2]
        edges = index[:, 0]
        pos = index[:, 1] if index.shape[1] == 2 else None
        cache = prepare_edges(model, self.graph, pairs, job.direction, job.cost)  # the graph's head convention
        batch = batch or 1
        effects = torch.zeros(len(nodes), pairs.n_pairs, dtype=torch.float64)
        receivers = self.graph.receiver_index[edges].tolist()
        layer_of = torch.tensor([self.graph.receiver_layer(r) for r in receivers], dtype=torch.long)  # [n]
        for layer in layer_of.unique().tolist():
            # One element per (edge of this layer, pair): a forward started at the receiver's layer.
            rank = torch.nonzero(layer_of == layer)[:, 0].repeat_interleave(pairs.n_pairs)
            pair = torch.arange(pairs.n_pairs).repeat(int((layer_of == layer).sum()))
            for start in range(0, len(rank), batch):
                r, p = rank[start : start + batch], pair[start : start + batch]
                at = None if pos is None else pos[r]
                effects[r, p] = patch_edges(model, cache, layer, p, edges[r], job.cost, at).double().cpu()
                if advance is not None:
                    advance(len(r))
        return effects, cache.base_metric
