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


# Random dictionaries written in the three formats ``atpstar.load_dictionary`` reads ----------------------------


def random_dictionary_weights(d_in: int, d_sae: int, seed: int = 0, dtype: torch.dtype = torch.float64,
                              threshold: bool = False, skip: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
    """SAELens-oriented random weights (``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in], biases; ``threshold``
    and ``W_skip`` [d_in, d_in] on request): about half the latents active on O(1) inputs, unit-scale writes."""
    gen = torch.Generator().manual_seed(seed)
    out = {
        "W_enc": torch.randn(d_in, d_sae, generator=gen) / d_in**0.5,
        "W_dec": torch.randn(d_sae, d_in, generator=gen) / d_sae**0.5,
        "b_enc": 0.1 * torch.randn(d_sae, generator=gen),
        "b_dec": 0.1 * torch.randn(d_in, generator=gen),
    }
    if threshold:
        out["threshold"] = 0.05 + 0.1 * torch.rand(d_sae, generator=gen)
    if skip:
        out["W_skip"] = 0.1 * torch.randn(d_in, d_in, generator=gen) / d_in**0.5
    return {k: v.to(dtype) for k, v in out.items()}


def write_saelens(folder: Any, hook: str, d_in: int, d_sae: int, seed: int = 0, activation: str = "relu",
                  k: int = 4, **cfg: Any) -> Any:  # fmt: skip
    """A SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) of a random SAE at ``hook``; returns it.

    ``activation``: ``"relu"`` (architecture standard), ``"jumprelu"`` or ``"topk"`` (with ``k``); ``cfg``
    overrides config keys (``apply_b_dec_to_input``, ``normalize_activations``, ``neuronpedia_id``...).
    """
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = random_dictionary_weights(d_in, d_sae, seed, threshold=activation == "jumprelu")
    architecture = {"relu": "standard"}.get(activation, activation)
    config = {"d_in": d_in, "d_sae": d_sae, "architecture": architecture, "dtype": "float64", "device": "cpu",
              "apply_b_dec_to_input": True, "normalize_activations": "none", "metadata": {"hook_name": hook}}  # fmt: skip
    if activation == "topk":
        config["k"] = k
    config.update(cfg)
    (folder / "cfg.json").write_text(json.dumps(config))
    save_file({n: v.contiguous() for n, v in weights.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def write_gemma_scope(root: Any, kind: str, layer: int, d_in: int, d_sae: int, seed: int = 0) -> Any:
    """A Gemma Scope 2 folder ``root/{kind}/layer_{layer}_width_{d_sae}_l0_small/params.safetensors`` (lower-case
    keys, JumpReLU) of a random SAE (``kind``: resid_post, attn_out, mlp_out) or transcoder; returns the folder."""
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(root) / kind / f"layer_{layer}_width_{d_sae}_l0_small"
    folder.mkdir(parents=True, exist_ok=True)
    weights = random_dictionary_weights(d_in, d_sae, seed, threshold=True)
    save_file({n.lower(): v.contiguous() for n, v in weights.items()}, str(folder / "params.safetensors"))
    return folder


def write_circuit_tracer(folder: Any, layers: list[int], d_in: int, d_sae: int, seed: int = 0,
                         input_hook: str = "hook_mlp_in", output_hook: str = "hook_mlp_out",
                         skip: bool = True, jumprelu: bool = False) -> Any:  # fmt: skip
    """A circuit-tracer transcoder folder (``config.yaml`` + ``layer_{i}.safetensors``, ``W_enc`` [d_sae, d_in] and
    ``W_dec`` [d_in, d_sae] as circuit-tracer stores them, ``W_skip`` applied as x W_skipᵀ); returns it."""
    from pathlib import Path

    import yaml
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for layer in layers:
        weights = random_dictionary_weights(d_in, d_sae, seed + layer, threshold=jumprelu, skip=skip)
        stored = {**weights, "W_enc": weights["W_enc"].T, "W_dec": weights["W_dec"].T}
        if skip:
            stored["W_skip"] = weights["W_skip"].T
        save_file({n: v.contiguous() for n, v in stored.items()}, str(folder / f"layer_{layer}.safetensors"))
        entries.append({"id": f"tc-layer{layer}", "layer": layer, "filepath": f"layer_{layer}.safetensors"})
    config = {"model_name": "atpstar-testing", "feature_input_hook": input_hook, "feature_output_hook": output_hook,
              "transcoders": entries}  # fmt: skip
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder
