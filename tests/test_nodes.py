"""nodes: node types, layouts and TransformerLens-style names."""

from __future__ import annotations

import pytest

import atpstar
from atpstar.nodes import Sizes, check_node_types, node_name, node_shape, pos_axis

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
    assert pos_axis("neuron") == 1 and pos_axis("key") == 2


def test_check_node_types_canonical_order_and_errors():
    assert check_node_types(["head", "neuron"]) == ["neuron", "head"]
    assert check_node_types("key") == ["key"]
    with pytest.raises(atpstar.InputError, match="neurons"):
        check_node_types(["neurons"])
    with pytest.raises(atpstar.InputError, match="non-empty"):
        check_node_types([])
    with pytest.raises(atpstar.InputError):
        node_shape("mlp", SIZES, 3)
