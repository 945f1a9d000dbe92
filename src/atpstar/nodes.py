"""Node types, their per-pair layouts and TransformerLens-style names. Pure data.

A *site node type* is a set of nodes read and patched at one runner site: one row (``NodeType``)
says everything about it, and the engines (exact patching, the gradient step, memory) receive rows,
never branch on names. ``NODE_TABLE`` holds the rows of every registered site space
(``atpstar.spaces.SiteNodes``): the five built-in types below, and any a ``SiteNodes`` subclass adds.
The node-space protocol above this module (``atpstar.spaces``) is what the verbs use.

Shape letters: P pairs, L layers, H query heads, K key/value heads, T positions, M d_mlp, N nodes.

| node type | axes                  | layout per pair | name                                          |
|-----------|-----------------------|-----------------|-----------------------------------------------|
| neuron    | (layer, pos, index)   | [L, T, M]       | ``blocks.{l}.mlp.hook_post[pos {t}, {i}]``    |
| query     | (layer, head, pos)    | [L, H, T]       | ``blocks.{l}.attn.hook_q[pos {t}, head {h}]`` |
| key       | (layer, head, pos)    | [L, K, T]       | ``blocks.{l}.attn.hook_k[pos {t}, head {g}]`` |
| value     | (layer, head, pos)    | [L, K, T]       | ``blocks.{l}.attn.hook_v[pos {t}, head {g}]`` |
| head      | (layer, head, pos)    | [L, H, T]       | ``blocks.{l}.attn.hook_z[pos {t}, head {h}]`` |
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InputError
from .model import Sizes  # the model's sizes fix every node layout


@dataclass(frozen=True)
class NodeType:
    """Everything the package knows about one node type.

    A layout has three axes: ``layer`` first, then a unit axis and ``pos`` in either order. Each node
    type reads its own runner site (two types on one site would patch each other's nodes).
    """

    name: str
    axes: tuple[str, ...]  # index names of the per-pair layout, in order; also the ``to_rows`` columns
    unit_size: str | None  # the ``Sizes`` field that sizes the unit axis (neither layer nor pos); None: no unit axis
    hook: str  # TransformerLens hook name inside ``blocks.{l}``
    site: str  # runner site it is read and patched at (``runner.SITES``)
    vector: bool  # the site holds a vector per node ([B, H|K, T, E], [B, T, D]); estimates sum over it
    unit_label: str  # prefix of the unit in node names ("head " -> "[pos 5, head 2]")
    feeds_scores: bool = False  # the site is a query or key vector: the QK fix replaces its linear estimate

    @property
    def pos_axis(self) -> int:
        """Axis of the position in the per-pair layout."""
        return self.axes.index("pos")

    @property
    def unit_axis(self) -> int | None:
        """Axis of the unit (head, kv head or neuron) in the per-pair layout; None without one."""
        return next((i for i, axis in enumerate(self.axes) if axis not in ("layer", "pos")), None)

    def shape(self, sizes: Sizes, seq_len: int) -> tuple[int, ...]:
        lengths = {"layer": sizes.n_layers, "pos": seq_len}
        return tuple(lengths[axis] if axis in lengths else getattr(sizes, str(self.unit_size)) for axis in self.axes)

    def pullback(self, diff: torch.Tensor, grad: torch.Tensor, scale: Any = None) -> torch.Tensor:
        """Per-node linear score from the site's activation difference and gradient (both [b, *site]):
        diff · grad per node, summed over the vector a node holds. [b, *layout[1:]].

        ``scale`` (e.g. a path's mean over its points) applies to the elementwise product, before the sum.
        """
        prod = diff * grad  # [b, T, M] or [b, H|K, T, E] or [b, T, D]
        if scale is not None:
            prod = scale(prod)
        return prod.sum(-1) if self.vector else prod

    def node_name(self, index: tuple[int, ...]) -> str:
        """TransformerLens-style name of one node, e.g. ``blocks.3.attn.hook_k[pos 5, head 2]``."""
        unit = "" if self.unit_axis is None else f", {self.unit_label}{index[self.unit_axis]}"
        return f"blocks.{index[0]}.{self.hook}[pos {index[self.pos_axis]}{unit}]"


_ATTENTION_AXES = ("layer", "head", "pos")

NODE_TABLE: dict[str, NodeType] = {
    t.name: t
    for t in (
        NodeType("neuron", ("layer", "pos", "index"), "d_mlp", "mlp.hook_post", "neuron", False, ""),
        NodeType("query", _ATTENTION_AXES, "n_heads", "attn.hook_q", "q", True, "head ", feeds_scores=True),
        NodeType("key", _ATTENTION_AXES, "n_kv_heads", "attn.hook_k", "k", True, "head ", feeds_scores=True),
        NodeType("value", _ATTENTION_AXES, "n_kv_heads", "attn.hook_v", "v", True, "head "),
        NodeType("head", _ATTENTION_AXES, "n_heads", "attn.hook_z", "z", True, "head "),
    )
}

NODE_TYPES: tuple[str, ...] = tuple(NODE_TABLE)

# Columns of node tables (``Attribution.to_rows``, ``Verification.to_rows``): the union of the axes.
INDEX_COLUMNS: tuple[str, ...] = ("layer", "head", "pos", "index")


def node_shape(node_type: str, sizes: Sizes, seq_len: int) -> tuple[int, ...]:
    """Layout of one pair's site nodes of ``node_type`` (without the pair axis)."""
    if node_type not in NODE_TABLE:
        raise InputError(f"{node_type!r} is not a site node type; site node types: {list(NODE_TABLE)}")
    return NODE_TABLE[node_type].shape(sizes, seq_len)


def node_name(node_type: str, index: tuple[int, ...]) -> str:
    """TransformerLens-style name of one site node, e.g. ``blocks.3.attn.hook_k[pos 5, head 2]``."""
    return NODE_TABLE[node_type].node_name(index)


def unit_and_pos(node_type: str, index: tuple[Any, ...]) -> tuple[Any, Any]:
    """(unit, pos) of a layout index ``(layer, a, b)``; works on ints and on index tensors alike."""
    row = NODE_TABLE[node_type]
    pos = index[row.pos_axis]
    if row.unit_axis is None:  # one node per (layer, pos): unit 0
        return (torch.zeros_like(pos) if isinstance(pos, torch.Tensor) else 0), pos
    return index[row.unit_axis], pos


def layout_index(node_type: str, layer: Any, unit: Any, pos: Any) -> tuple[Any, ...]:
    """The layout index (in axis order) of the node(s) at ``layer``, ``unit``, ``pos`` (ints or tensors).

    Pass ``layer=None`` for the index into one layer's activation ([B, *layout[1:]] after a batch axis).
    """
    row = NODE_TABLE[node_type]
    parts = {"layer": layer, "pos": pos}
    index = tuple(parts.get(axis, unit) for axis in row.axes)
    return index[1:] if layer is None else index


@dataclass(frozen=True)
class NodeLayout:
    """Several node types laid end to end on one flat node axis (N), in the order of ``shapes``.

    Attributes:
        shapes: node type -> per-pair layout (as ``node_shape``); its order is the flat order.
    """

    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, node_types: list[str], sizes: Sizes, seq_len: int) -> NodeLayout:
        """The layout of site node types (``NODE_TABLE`` rows) on a model of ``sizes``."""
        return cls({t: node_shape(t, sizes, seq_len) for t in node_types})

    @classmethod
    def spanning(cls, spaces: Iterable[Any], seq_len: int) -> NodeLayout:
        """The layout of every node type of ``spaces`` (bound ``atpstar.spaces.NodeSpace``s), in their order."""
        return cls({t: tuple(space.shape(t, seq_len)) for space in spaces for t in space.node_types})

    @classmethod
    def like(cls, tensors: dict[str, torch.Tensor], node_types: list[str], lead: int = 0) -> NodeLayout:
        """The layout of ``tensors[t]`` [*lead, *layout] for ``node_types``."""
        return cls({t: tuple(tensors[t].shape[lead:]) for t in node_types})

    @property
    def node_types(self) -> list[str]:
        return list(self.shapes)

    def count(self, node_type: str) -> int:
        return int(torch.Size(self.shapes[node_type]).numel())

    @property
    def size(self) -> int:
        """N, the number of nodes of all types."""
        return sum(self.count(t) for t in self.shapes)

    def span(self, node_type: str) -> slice:
        """Where ``node_type`` lies on the flat axis."""
        start = 0
        for t in self.shapes:
            if t == node_type:
                return slice(start, start + self.count(t))
            start += self.count(t)
        raise KeyError(node_type)

    def flatten(self, tensors: dict[str, torch.Tensor], fill: Any = None) -> torch.Tensor:
        """{t: [*lead, *layout]} -> [*lead, N]; a missing type is filled with ``fill`` (None: required)."""
        first = next(t for t in self.shapes if t in tensors)
        present = tensors[first]
        lead = present.shape[: present.ndim - len(self.shapes[first])]
        parts = []
        for t in self.shapes:
            if t in tensors or fill is None:
                parts.append(tensors[t].reshape(*lead, self.count(t)))  # [*lead, *layout] -> [*lead, n_t]
            else:
                parts.append(torch.full((*lead, self.count(t)), fill, dtype=present.dtype))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """[*lead, N] -> {t: [*lead, *layout]} (views where possible)."""
        lead = flat.shape[:-1]
        return {t: flat[..., self.span(t)].reshape(*lead, *shape) for t, shape in self.shapes.items()}

    def locate(self, position: int) -> tuple[str, tuple[int, ...]]:
        """(node type, layout index) of one flat position."""
        for t, shape in self.shapes.items():
            if position < self.count(t):
                return t, tuple(int(i) for i in torch.unravel_index(torch.tensor(position), shape))
            position -= self.count(t)
        raise IndexError(position)

    def split(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat positions [N'] -> (type index into ``node_types`` [N'], position within the type [N'])."""
        ends = torch.tensor([self.count(t) for t in self.shapes]).cumsum(0)  # [types]
        type_index = torch.searchsorted(ends, positions, right=True)
        starts = ends - torch.tensor([self.count(t) for t in self.shapes])
        return type_index, positions - starts[type_index]

    def position(self, type_index: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Inverse of ``split``: flat positions [N'] of (type index, position within the type) [N'] each."""
        starts = torch.tensor([0] + [self.count(t) for t in self.shapes]).cumsum(0)  # [types + 1]
        return starts[type_index] + index
