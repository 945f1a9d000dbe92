"""Site nodes: nodes read and patched at one runner site each (the five built-in types, and more).

Every node type of a site space is one ``nodes.NodeType`` row: the runner site it lives at, its
layout axes, whether the site holds a vector per node, and its TransformerLens hook. The engines
(exact patching, the gradient step, memory plans) work from rows alone, so a new site space is a
subclass that lists its rows in ``ROWS``, registered with ``register_space`` — e.g. the residual
stream per position::

    RESID = NodeType("resid", ("layer", "pos"), None, "hook_resid_pre", "resid_pre", True, "")

    @register_space
    class ResidNodes(SiteNodes):
        kind = "resid"
        ROWS = {"resid": RESID}

Exact patching of listed nodes: one patched forward per (node, pair), started at the node's layer and
position from the cached base run (``engine``), batched by layer.

Shape letters: P pairs, N nodes, T positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from ..engine import cache_bytes, element_bytes, patch_listed, prepare
from ..nodes import NODE_TABLE, NodeType, unit_and_pos
from .base import Advance, NodeSpace, register_space


class SiteNodes(NodeSpace):
    """Node types read and patched at runner sites (``nodes.NodeType`` rows).

    Attributes:
        sizes: the model's ``Sizes`` (None for a space rebuilt from a saved result: names only).
    """

    kind: ClassVar[str] = "sites"
    engine: ClassVar[str] = "sites"  # the method entry point that runs it (``Method.engines``)
    ROWS: ClassVar[Mapping[str, NodeType]] = {}

    def __init__(self, node_types: Sequence[str], sizes: Any = None) -> None:
        super().__init__(node_types)
        self.sizes = sizes

    @classmethod
    def on_register(cls) -> None:
        for name, row in cls.ROWS.items():  # the engines look rows up by name
            if NODE_TABLE.get(name, row) != row:
                raise ValueError(f"site node type {name!r} is defined twice with different rows")
        NODE_TABLE.update(cls.ROWS)

    @classmethod
    def on_unregister(cls) -> None:
        for name in cls.ROWS:
            NODE_TABLE.pop(name, None)

    @classmethod
    def owns(cls, node_type: str) -> bool:
        return node_type in cls.ROWS

    @classmethod
    def known_types(cls) -> tuple[str, ...]:
        return tuple(cls.ROWS)

    @classmethod
    def bind(cls, model: Any, node_types: Sequence[str], options: Mapping[str, Any]) -> NodeSpace:
        return cls(node_types, model.sizes)

    @classmethod
    def from_info(cls, info: Mapping[str, Any], node_types: Sequence[str]) -> NodeSpace:
        return cls(node_types)

    def row(self, node_type: str) -> NodeType:
        return self.ROWS[node_type]

    def axes(self, node_type: str) -> tuple[str, ...]:
        return self.row(node_type).axes

    def shape(self, node_type: str, seq_len: int) -> tuple[int, ...]:
        if self.sizes is None:
            raise RuntimeError("a site space rebuilt from a saved result has no model sizes; bind it to the model")
        return self.row(node_type).shape(self.sizes, seq_len)

    def name(self, node_type: str, index: tuple[int, ...]) -> str:
        return self.row(node_type).node_name(index)

    def pullback(self, node_type: str, diff: torch.Tensor, grad: torch.Tensor, scale: Any = None) -> torch.Tensor:
        """The gradient at the node type's site as per-node scores: diff · grad per node ([b, *layout[1:]])."""
        return self.row(node_type).pullback(diff, grad, scale)

    def attribute(self, method: Any, job: Any) -> tuple[Any, dict[str, torch.Tensor], dict[str, Any]]:
        return method._attribute(job.model, job.pairs, list(self.node_types), job.direction, job.cost, job.progress)

    def element_bytes(self, job: Any) -> int:
        return element_bytes(job.model, job.seq_len)

    def pair_bytes(self, job: Any) -> int:
        return cache_bytes(job.model, 1, job.seq_len, list(self.node_types))

    def exact_effects(
        self, job: Any, nodes: list[tuple[str, tuple[int, ...]]], batch: int | None, advance: Advance | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cache = prepare(job.model, job.pairs, job.direction, list(self.node_types), job.cost, chunk=batch)
        ranked = self.ranked_index(nodes)
        effects = patch_listed(job.model, cache, list(self.node_types), ranked, batch or 1, job.cost, advance)
        return effects, cache.base_metric

    def ranked_index(
        self, nodes: list[tuple[str, tuple[int, ...]]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The engine's node tuple: (type index into ``node_types``, layer, unit, position), each [n]."""
        types = list(self.node_types)
        listed = torch.tensor(
            [(types.index(t), index[0], *unit_and_pos(t, index)) for t, index in nodes], dtype=torch.long
        ).reshape(len(nodes), 4)  # [n, (type, layer, unit, pos)]
        type_index, layer, unit, pos = listed.unbind(1)  # 4 x [n]
        return type_index, layer, unit, pos


@register_space
class BuiltinSites(SiteNodes):
    """Neurons, queries, keys, values and head outputs (``nodes.NODE_TABLE``'s built-in rows)."""

    kind = "sites"
    ROWS = dict(NODE_TABLE)

    @classmethod
    def on_unregister(cls) -> None:  # the built-in rows stay: the engines' own table
        pass
