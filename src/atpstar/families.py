"""Where each supported model family keeps its parts, and what it needs to run layer by layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import UnsupportedModelError
from .nodes import Sizes


@dataclass(frozen=True)
class Family:
    """Attribute paths inside a ``transformers`` causal LM of one family.

    Paths are dotted and relative to the causal-LM object (``base`` first, then the rest relative to it).
    """

    name: str
    model_types: tuple[str, ...]
    base: str  # the decoder stack module
    layers: str  # list of decoder layers, relative to base
    final_norm: str
    rotary: str | None  # rotary embedding module, relative to base; None for learned positions
    attention: str  # attention module, relative to a layer
    mlp_out: str  # MLP output projection (its input holds the neurons), relative to a layer
    token_embed: str  # token embedding, relative to base
    position_embed: str | None  # learned absolute position embedding, relative to base
    parallel_residual: bool


FAMILIES: tuple[Family, ...] = (
    Family("gpt2", ("gpt2",), "transformer", "h", "ln_f", None, "attn", "mlp.c_proj", "wte", "wpe", False),
    Family(
        "gpt_neox",
        ("gpt_neox",),
        "gpt_neox",
        "layers",
        "final_layer_norm",
        "rotary_emb",
        "attention",
        "mlp.dense_4h_to_h",
        "embed_in",
        None,
        True,
    ),
    Family(
        "llama",
        ("llama", "mistral", "qwen2"),
        "model",
        "layers",
        "norm",
        "rotary_emb",
        "self_attn",
        "mlp.down_proj",
        "embed_tokens",
        None,
        False,
    ),
)

SUPPORTED = sorted(t for family in FAMILIES for t in family.model_types)


def get_path(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def family_of(hf_model: Any) -> Family:
    """The family entry for a model, or a clear error naming the supported ones."""
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            check_attention_features(hf_model.config, model_type)
            return family
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported; supported families: {SUPPORTED} "
        "(GPT-2, GPT-NeoX/Pythia, Llama-family incl. SmolLM2, Mistral, Qwen2)"
    )


def check_attention_features(config: Any, model_type: str) -> None:
    """Refuse attention variants the engine does not compute exactly."""
    for attr in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, attr, None):
            raise UnsupportedModelError(f"{model_type}: {attr} is not implemented; the engine refuses soft-capping")
    if getattr(config, "use_sliding_window", True) and getattr(config, "sliding_window", None):
        raise UnsupportedModelError(
            f"{model_type}: sliding-window attention (sliding_window={config.sliding_window}) is not implemented; "
            "set config.sliding_window = None if your prompts are shorter than the window"
        )
    if getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError(f"{model_type}: cross-attention is not supported")


def sizes_of(config: Any) -> Sizes:
    n_heads = int(config.num_attention_heads)
    d_model = int(config.hidden_size)
    d_head = int(getattr(config, "head_dim", None) or d_model // n_heads)
    d_mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d_model
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    return Sizes(int(config.num_hidden_layers), n_heads, int(n_kv), d_head, int(d_mlp), d_model)


def embed(family: Family, hf_model: Any, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Residual stream entering layer 0 for token ids [B, T] at positions start..start+T-1."""
    base = get_path(hf_model, family.base)
    hidden = get_path(base, family.token_embed)(ids)
    if family.position_embed is not None:
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        hidden = hidden + get_path(base, family.position_embed)(positions)[None].to(hidden.device)
    return hidden
