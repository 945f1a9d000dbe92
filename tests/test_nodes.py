"""nodes: node types, layouts and TransformerLens-style names."""

from __future__ import annotations

import pytest
import torch

import atpstar
from atpstar.nodes import NODE_TABLE, Sizes, node_name, node_shape
from atpstar.spaces import BuiltinSites, check_node_types

SIZES = Sizes(n_layers=3, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=16, d_model=32)


def test_node_types():
    assert atpstar.NODE_TYPES == ("neuron", "query", "key", "value", "head")


def test_names():
    assert node_name("key", (3, 2, 5)) == "blocks.3.attn.hook_k[pos 5, head 2]"
    assert node_name("query", (0, 1, 4)) == "blocks.0.attn.hook_q[pos 4, head 1]"
    assert node_name("value", (1, 0, 2)) == "blocks.1.attn.hook_v[pos 2, head 0]"
    assert node_name("head", (2, 3, 0)) == "blocks.2.attn.hook_z[pos 0, head 3]"
    assert node_name("neuron", (1, 4, 7)) == "blocks.1.mlp.hook_post[pos 4, 7]"


def test_shapes():
    assert node_shape("neuron", SIZES, 6) == (3, 6, 16)
    assert node_shape("query", SIZES, 6) == (3, 4, 6)
    assert node_shape("head", SIZES, 6) == (3, 4, 6)
    assert node_shape("key", SIZES, 6) == (3, 2, 6)
    assert node_shape("value", SIZES, 6) == (3, 2, 6)
    assert NODE_TABLE["neuron"].pos_axis == 1 and NODE_TABLE["key"].pos_axis == 2


def test_check_node_types_canonical_order_and_errors():
    assert check_node_types(["head", "neuron"]) == ["neuron", "head"]
    assert check_node_types("key") == ["key"]
    with pytest.raises(atpstar.InputError, match="neurons"):
        check_node_types(["neurons"])
    with pytest.raises(atpstar.InputError, match="non-empty"):
        check_node_types([])
    with pytest.raises(atpstar.InputError):
        node_shape("mlp", SIZES, 3)


def test_table_rows_agree_with_names_and_columns():
    from atpstar.nodes import layout_index, unit_and_pos

    index_columns = BuiltinSites(list(NODE_TABLE)).columns

    assert set(NODE_TABLE) == set(atpstar.NODE_TYPES)
    assert index_columns("neuron", (1, 4, 7)) == {"layer": 1, "pos": 4, "index": 7}
    assert index_columns("key", (3, 2, 5)) == {"layer": 3, "head": 2, "pos": 5}
    for t, row in NODE_TABLE.items():
        shape = node_shape(t, SIZES, 6)
        assert shape[row.pos_axis] == 6 and shape[0] == SIZES.n_layers
        index = layout_index(t, 2, 1, 5)
        assert unit_and_pos(t, index) == (1, 5)
        assert f"blocks.2.{row.hook}[pos 5, " in node_name(t, index)
        assert layout_index(t, None, 1, 5) == index[1:]


def test_node_layout_flatten_round_trip_and_locate():
    from atpstar.nodes import NodeLayout

    layout = NodeLayout.of(["neuron", "key"], SIZES, 4)
    n_neuron, n_key = 3 * 4 * 16, 3 * 2 * 4
    assert layout.size == n_neuron + n_key and layout.span("key") == slice(n_neuron, n_neuron + n_key)
    tensors = {t: torch.randn(5, *shape) for t, shape in layout.shapes.items()}
    flat = layout.flatten(tensors)  # [5, N]
    assert flat.shape == (5, layout.size)
    assert torch.equal(flat, torch.cat([tensors[t].reshape(5, -1) for t in layout.shapes], 1))
    back = layout.unflatten(flat)
    assert all(torch.equal(back[t], tensors[t]) for t in tensors)
    position = n_neuron + 2 * 4 + 3  # key layer 1, head 0, pos 3 (layout [3, 2, 4])
    assert layout.locate(position) == ("key", (1, 0, 3))
    type_index, within = layout.split(torch.tensor([0, position]))
    assert type_index.tolist() == [0, 1] and within.tolist() == [0, position - n_neuron]
    assert layout.position(type_index, within).tolist() == [0, position]
    partial = layout.flatten({"key": torch.ones(3, 2, 4, dtype=torch.bool)}, fill=False)
    assert int(partial.sum()) == n_key and not bool(partial[:n_neuron].any())
