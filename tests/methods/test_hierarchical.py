"""Hierarchical group testing: split blocks with large |effect| down to single nodes."""

from __future__ import annotations

import pytest
import torch

import atpstar
from reference.toys import sparse_additive_toy


def test_threshold_finds_planted_nodes_with_exact_effects_and_honest_cost():
    model, pairs = sparse_additive_toy()
    truth = atpstar.attribute(model, pairs, "activation_patching", nodes=["neuron"])
    planted = [(0, 3, 5), (0, 3, 11)]
    smallest = min(float(truth.per_pair["neuron"][(slice(None), *n)].abs().mean()) for n in planted)
    assert smallest > 100 * float(truth.per_pair["neuron"][:, 0, 3, [0, 1, 2, 3, 4, 6]].abs().max())
    result = atpstar.attribute(model, pairs, "hierarchical", nodes=["neuron"], branching=4, threshold=0.1 * smallest)
    assert {node.index for node in result.top(2)} == set(planted)
    for node in planted:  # reached as single nodes: exact effects
        torch.testing.assert_close(result.per_pair["neuron"][(slice(None), *node)],
                                   truth.per_pair["neuron"][(slice(None), *node)], rtol=0, atol=1e-12)
    # Tree over 64 neurons, branching 4: root (1), its 4 children; only the last-position block
    # (16 neurons) is large -> 4 children; blocks 4..7 and 8..11 are large -> 4 + 4 singles.
    assert result.info["blocks_patched"] == 1 + 4 + 4 + 8
    assert result.cost.forward == pytest.approx(2 * 2 + 2 * result.info["blocks_patched"])
    assert result.cost.forward < truth.cost.forward
    # never-reached nodes keep their last block's effect: positions 0..2 share the effect of block 0..15
    assert torch.equal(result.per_pair["neuron"][:, 0, 0, 0], result.per_pair["neuron"][:, 0, 0, 15])


def test_budget_caps_block_patches_and_splits_largest_first():
    model, pairs = sparse_additive_toy(n_layers=2, n_pairs=1)
    result = atpstar.attribute(model, pairs, "hierarchical", nodes=["neuron", "head"], budget=20, branching=2)
    assert result.info["blocks_patched"] <= 20
    # roots: 2 layers x 2 node types; every patched forward is one pair, layer 0 counts 1, layer 1 counts 1/2
    assert result.cost.forward <= 2 + 20
    top = result.top(1)[0]
    assert top.node_type == "neuron" and top.index[1] == 3


def test_default_budget_is_a_tenth_of_the_nodes():
    model, pairs = sparse_additive_toy()
    result = atpstar.attribute(model, pairs, "hierarchical", nodes=["neuron"])
    assert result.info["budget"] == 7 and result.info["blocks_patched"] <= 7


@pytest.mark.parametrize("options", [{"branching": 1}, {"threshold": -1.0}, {"budget": 0}])
def test_bad_options(options):
    model, pairs = sparse_additive_toy()
    with pytest.raises(atpstar.InputError):
        atpstar.attribute(model, pairs, "hierarchical", nodes=["neuron"], **options)
