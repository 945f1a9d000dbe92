"""Small models whose answers are known, shared by the tests of the alternatives and the bound."""

from __future__ import annotations

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

import atpstar

PLANTED_NEURONS = (5, 11)


def sparse_additive_toy(
    n_layers: int = 1, n_pairs: int = 2, seq_len: int = 4, seed: int = 0, planted: bool = True, d_mlp: int = 16
) -> tuple[atpstar.Model, atpstar.PromptPairs]:
    """Parallel-residual GPT-NeoX without final norm, float64: with one layer, neuron effects add up
    exactly. ``planted``: every MLP output column scaled 1e-3 except neurons 5 (x50) and 11 (x-30)."""
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=n_layers, num_attention_heads=2, intermediate_size=d_mlp,
        max_position_embeddings=16, use_parallel_residual=True, hidden_dropout=0.0, attention_dropout=0.0,
        initializer_range=0.3,
    )
    hf_model = GPTNeoXForCausalLM(config).double().eval()
    hf_model.gpt_neox.final_layer_norm = torch.nn.Identity()
    if planted:
        with torch.no_grad():
            for layer in hf_model.gpt_neox.layers:
                weight = layer.mlp.dense_4h_to_h.weight  # [D, M]
                scale = torch.full((weight.shape[1],), 1e-3, dtype=weight.dtype)
                scale[PLANTED_NEURONS[0]], scale[PLANTED_NEURONS[1]] = 50.0, -30.0
                weight *= scale
    g = torch.Generator().manual_seed(seed + 1)

    def tokens(*shape: int) -> torch.Tensor:
        return torch.randint(0, 30, shape, generator=g)

    clean, noise = tokens(n_pairs, seq_len), tokens(n_pairs, seq_len)
    answer, distractor = tokens(n_pairs), tokens(n_pairs)
    distractor = torch.where(distractor == answer, (answer + 1) % 30, distractor)  # a competitor, not the answer
    pairs = atpstar.PromptPairs(clean, noise, answer, distractor)
    return atpstar.Model(hf_model), pairs
