"""Node types, their per-pair layouts and TransformerLens-style names. Pure data.

Shape letters: P pairs, L layers, H query heads, K key/value heads, T positions, M d_mlp.

| node type | index          | layout per pair | name                                   |
|-----------|----------------|-----------------|----------------------------------------|
| neuron    | (l, t, i)      | [L, T, M]       | ``blocks.{l}.mlp.hook_post[pos {t}, {i}]`` |
| query     | (l, h, t)      | [L, H, T]       | ``blocks.{l}.attn.hook_q[pos {t}, head {h}]`` |
| key       | (l, g, t)      | [L, K, T]       | ``blocks.{l}.attn.hook_k[pos {t}, head {g}]`` |
| value     | (l, g, t)      | [L, K, T]       | ``blocks.{l}.attn.hook_v[pos {t}, head {g}]`` |
| head      | (l, h, t)      | [L, H, T]       | ``blocks.{l}.attn.hook_z[pos {t}, head {h}]`` |
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError

NODE_TYPES: tuple[str, ...] = ("neuron", "query", "key", "value", "head")

# Edges of the MIB/EAP-IG graph (``atpstar.edges``): layout [N] per pair, N = len(edge_names(model)).
# Asked for by name (``nodes=["edge"]``), never part of the default node types.
EDGE_TYPE = "edge"
ALL_TYPES: tuple[str, ...] = NODE_TYPES + (EDGE_TYPE,)

# The activation site each node type replaces, as TransformerLens names it.
HOOK_NAMES: dict[str, str] = {
    "neuron": "mlp.hook_post",
    "query": "attn.hook_q",
    "key": "attn.hook_k",
    "value": "attn.hook_v",
    "head": "attn.hook_z",
}

# Index order of each node type inside its per-pair layout.
INDEX_NAMES: dict[str, tuple[str, ...]] = {
    "neuron": ("layer", "pos", "neuron"),
    "query": ("layer", "head", "pos"),
    "key": ("layer", "head", "pos"),
    "value": ("layer", "head", "pos"),
    "head": ("layer", "head", "pos"),
}


@dataclass(frozen=True)
class Sizes:
    """Model sizes that fix every node layout."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_model: int


def node_shape(node_type: str, sizes: Sizes, seq_len: int) -> tuple[int, ...]:
    """Layout of one pair's nodes of ``node_type`` (without the pair axis)."""
    check_node_types([node_type])
    if node_type == "neuron":
        return (sizes.n_layers, seq_len, sizes.d_mlp)
    heads = sizes.n_heads if node_type in ("query", "head") else sizes.n_kv_heads
    return (sizes.n_layers, heads, seq_len)


def check_node_types(node_types: object) -> list[str]:
    """Validate a list of node type names and return it as a list, in canonical order."""
    if isinstance(node_types, str):
        node_types = [node_types]
    if not isinstance(node_types, (list, tuple)) or not node_types:
        raise InputError(f"nodes must be a non-empty list of node types from {list(ALL_TYPES)}; got {node_types!r}")
    unknown = [t for t in node_types if t not in ALL_TYPES]
    if unknown:
        raise InputError(f"unknown node type(s) {unknown}; choose from {list(ALL_TYPES)}")
    return [t for t in ALL_TYPES if t in node_types]


def node_name(node_type: str, index: tuple[int, ...]) -> str:
    """TransformerLens-style name of one node, e.g. ``blocks.3.attn.hook_k[pos 5, head 2]``."""
    if node_type == "neuron":
        layer, pos, unit = index
        return f"blocks.{layer}.{HOOK_NAMES[node_type]}[pos {pos}, {unit}]"
    layer, head, pos = index
    return f"blocks.{layer}.{HOOK_NAMES[node_type]}[pos {pos}, head {head}]"


def pos_axis(node_type: str) -> int:
    """Axis of the position index in a per-pair layout."""
    return 1 if node_type == "neuron" else 2
