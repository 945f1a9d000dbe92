"""Tiny offline models and prompt pairs for the method contract, and the model-unchanged check.

Shape letters: P pairs, T positions.
"""

from __future__ import annotations

from typing import Any

import torch

from ..model import Model
from ..pairs import PromptPairs

VOCAB = 48


def tiny_model(seed: int = 8, n_layers: int = 2) -> Model:
    """A tiny random float64 Llama (d_model 32, 4 heads, 2 kv heads, d_mlp 32) in eval mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=16,
        hidden_size=32,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=32,
        initializer_range=0.25,  # metrics and effects of order 1
    )
    torch.manual_seed(seed)
    return Model(AutoModelForCausalLM.from_config(config).to(torch.float64).eval(), model_id="atpstar-testing-llama")


def tiny_pairs(n_pairs: int = 3, seq_len: int = 5, seed: int = 9, metric: Any = "logit_diff") -> PromptPairs:
    """Random prompt pairs over ``VOCAB`` tokens whose noise prompt differs at two positions."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (n_pairs, seq_len), generator=gen)
    noise = clean.clone()
    noise[:, 1] = (clean[:, 1] + 1 + torch.randint(0, VOCAB - 1, (n_pairs,), generator=gen)) % VOCAB
    noise[:, seq_len - 2] = (clean[:, seq_len - 2] + 7) % VOCAB
    answer = torch.randint(0, VOCAB, (n_pairs,), generator=gen)
    distractor = (answer + 1 + torch.randint(0, VOCAB - 1, (n_pairs,), generator=gen)) % VOCAB
    return PromptPairs(clean=clean, noise=noise, answer=answer, distractor=distractor, metric=metric)


def snapshot(hf_model: torch.nn.Module) -> dict[str, Any]:
    """Everything ``attribute`` must leave as it found it: weights, modes, requires_grad, attention, hooks."""
    return {
        "state": {k: v.detach().clone() for k, v in hf_model.state_dict().items()},
        "training": [m.training for m in hf_model.modules()],
        "requires_grad": [p.requires_grad for p in hf_model.parameters()],
        "attn": [getattr(m.config, "_attn_implementation", None) for m in hf_model.modules() if hasattr(m, "config")],
        "hooks": [
            (len(m._forward_pre_hooks), len(m._forward_hooks), len(m._backward_hooks)) for m in hf_model.modules()
        ],
    }


def assert_unchanged(hf_model: torch.nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(hf_model)
    for key in ("training", "requires_grad", "attn", "hooks"):
        assert after[key] == before[key], f"model {key} changed"
    for name, value in before["state"].items():
        assert torch.equal(after["state"][name], value), f"weight {name} changed"
