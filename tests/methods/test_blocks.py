"""Blocks: contiguous blocks patched jointly, each node scored by its block's effect."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

import atpstar
import atpstar.methods.blocks  # noqa: F401  (registration, until methods/__init__ imports it)

PLANTED = [(0, 3, 5), (0, 3, 11)]  # (layer, pos, neuron): the last position reaches the metric


def sparse_additive_toy(n_layers: int = 1, n_pairs: int = 2, seq_len: int = 4, seed: int = 0):
    """1-layer parallel-residual GPT-NeoX without final norm (neuron effects add up exactly), float64,
    with every MLP output column scaled down 1000x except planted neurons 5 (x50) and 11 (x-30)."""
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=30, hidden_size=8, num_hidden_layers=n_layers, num_attention_heads=2,
                           intermediate_size=16, max_position_embeddings=16, use_parallel_residual=True,
                           hidden_dropout=0.0, attention_dropout=0.0, initializer_range=0.3)
    hf_model = GPTNeoXForCausalLM(config).double().eval()
    hf_model.gpt_neox.final_layer_norm = torch.nn.Identity()
    with torch.no_grad():
        for layer in hf_model.gpt_neox.layers:
            weight = layer.mlp.dense_4h_to_h.weight  # [D, M]
            scale = torch.full((weight.shape[1],), 1e-3, dtype=weight.dtype)
            scale[5], scale[11] = 50.0, -30.0
            weight *= scale
    g = torch.Generator().manual_seed(seed + 1)
    tokens = lambda *shape: torch.randint(0, 30, shape, generator=g)  # noqa: E731
    pairs = atpstar.PromptPairs(tokens(n_pairs, seq_len), tokens(n_pairs, seq_len), tokens(n_pairs), tokens(n_pairs))
    return atpstar.Model(hf_model), pairs


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
