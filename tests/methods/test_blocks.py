"""Blocks: contiguous blocks patched jointly, each node scored by its block's effect."""

from __future__ import annotations

import pytest
import torch

import atpstar
from reference.toys import sparse_additive_toy

PLANTED = [(0, 3, 5), (0, 3, 11)]  # (layer, pos, neuron): the last position reaches the metric


def test_block_effect_is_sum_of_its_nodes_on_additive_model_and_finds_planted():
    model, pairs = sparse_additive_toy()
    truth = atpstar.attribute(model, pairs, "activation_patching", nodes=["neuron"])
    result = atpstar.attribute(model, pairs, "blocks", nodes=["neuron"], block_size=4)
    flat_truth = truth.per_pair["neuron"].reshape(pairs.n_pairs, -1)  # [P, T * M], one layer
    flat = result.per_pair["neuron"].reshape(pairs.n_pairs, -1)
    for start in range(0, flat.shape[1], 4):
        block_sum = flat_truth[:, start : start + 4].sum(1)
        for offset in range(4):
            torch.testing.assert_close(flat[:, start + offset], block_sum, rtol=0, atol=1e-12)
    top_blocks = {node.index[2] // 4 for node in result.top(8)}
    assert top_blocks == {5 // 4, 11 // 4} and all(node.index[1] == 3 for node in result.top(8))
    torch.testing.assert_close(result.scores["neuron"], result.per_pair["neuron"].abs().mean(0))


def test_cost_counts_one_late_forward_per_block_and_pair():
    model, pairs = sparse_additive_toy(n_layers=2, n_pairs=3)
    result = atpstar.attribute(model, pairs, "blocks", nodes=["head", "neuron"], block_size=3)
    # head layout per layer (H=2, T=4): 8 nodes -> blocks of 3, 3, 2; neurons (T=4, M=16): 64 -> 22 blocks.
    blocks_per_layer = 3 + 22
    expected = 2 * 3 + 3 * blocks_per_layer * (1.0 + 0.5)  # layer 0 counts 1, layer 1 counts 1/2
    assert result.cost.forward == pytest.approx(expected)
    assert result.info["n_blocks"] == 2 * blocks_per_layer
    same = atpstar.attribute(model, pairs, "blocks", nodes=["head", "neuron"], block_size=3, batch_size=4)
    for t in ("head", "neuron"):
        torch.testing.assert_close(result.per_pair[t], same.per_pair[t], rtol=0, atol=1e-13)


def test_block_size_one_is_activation_patching():
    model, pairs = sparse_additive_toy(n_layers=2)
    truth = atpstar.attribute(model, pairs, "activation_patching", nodes=["key", "head"])
    result = atpstar.attribute(model, pairs, "blocks", nodes=["key", "head"], block_size=1)
    for t in ("key", "head"):
        torch.testing.assert_close(result.per_pair[t], truth.per_pair[t], rtol=0, atol=1e-13)
    assert result.cost.forward == pytest.approx(truth.cost.forward)


def test_bad_block_size():
    model, pairs = sparse_additive_toy()
    with pytest.raises(atpstar.InputError, match="block_size"):
        atpstar.attribute(model, pairs, "blocks", nodes=["neuron"], block_size=0)
