"""Where each supported model family keeps its parts, and what its attention does layer by layer.

One ``Family`` row per family (keyword fields, one comment each); the Llama-like rows derive from
``LLAMA`` and name only what differs. Module paths are dotted: ``base`` is relative to the causal-LM
object, the other paths relative to ``base`` or to one decoder layer. The layer paths name the
modules whose inputs and outputs are run sites (``runner.SITES``: attention and MLP outputs, the
stream the MLP reads, the neurons), so edges and other consumers never need a path of their own.
Per-layer attention arguments (sliding window, score soft-cap, score scaling, rotary table) are read
from the config into one ``LayerAttention`` per layer; the attention function checks them against
what the model itself passes, so a family row can never silently compute something else.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class LayerAttention:
    """What one layer's attention computes beyond ``softmax(q kᵀ · scaling)`` with a causal mask."""

    scaling: float  # factor on q·k before the soft-cap (1/sqrt(d_head), or query_pre_attn_scalar^-1/2)
    window: int | None = None  # sliding window: query t sees keys s with t - window < s <= t; None = all s <= t
    softcap: float | None = None  # score soft-cap c: scores become c·tanh(scores / c) before the mask
    rotary: str | None = None  # key into a per-layer rotary table (Gemma-3 "sliding_attention"); None = the one table


@dataclass(frozen=True)
class Family:
    """Attribute paths and attention features of one ``transformers`` causal-LM family."""

    name: str  # short name shown in reprs and errors
    model_types: tuple[str, ...]  # config.model_type values this row serves
    label: str  # human-readable list of the models it covers, for `atpstar models` and errors
    base: str  # the decoder stack module, relative to the causal LM
    layers: str  # list of decoder layers, relative to base
    final_norm: str  # norm before the unembedding, relative to base
    token_embed: str  # token embedding (Gemma's multiplies by sqrt(d_model) itself), relative to base
    attention: str  # attention module, relative to a layer (its q/k/v reach the attention function)
    out_proj: str  # attention output projection, relative to a layer: W_O of every head (attn_proj site)
    mlp: str  # MLP block, relative to a layer; its output is the mlp_out site unless mlp_post_norm is set
    mlp_in: str  # module whose input is what the MLP reads (its input norm, or the MLP itself): mlp_in site
    down_proj: str  # MLP output projection, relative to a layer; its input holds the neurons (neuron site)
    attn_post_norm: str | None = None  # norm between the attention output and the residual stream (post-norm)
    mlp_post_norm: str | None = None  # norm between the MLP output and the residual stream (post-norm)
    rotary: str | None = None  # rotary embedding module, relative to base; None for learned positions
    position_embed: str | None = None  # learned absolute position embedding, relative to base
    parallel_residual: bool = False  # attention and MLP read the same residual (GPT-NeoX, unless its config says not)
    window_layers: str = "none"  # where config.sliding_window applies: "none", "all" layers, or per "layer_types"
    score_softcap: str | None = None  # config field with the attention-score soft-cap (Gemma-2)
    logit_softcap: str | None = None  # config field with the final-logit soft-cap applied in unembed (Gemma-2/3)
    rotary_per_layer_type: bool = False  # the rotary module takes a layer type (Gemma-3: local and global bases)


# Rows: what the family is; where its stack keeps embeddings, norm and layers; where a layer keeps
# the site modules; then its features. The Llama layout most families share comes first, and the
# rows derived from it change only what differs.
# fmt: off
LLAMA = Family(
    name="llama", model_types=("llama", "mistral", "qwen2"),
    label="Llama-family incl. SmolLM2, Mistral (sliding window), Qwen2/Qwen2.5 (q/k/v biases)",
    base="model", token_embed="embed_tokens", rotary="rotary_emb", layers="layers", final_norm="norm",
    attention="self_attn", out_proj="self_attn.o_proj",
    mlp_in="post_attention_layernorm", mlp="mlp", down_proj="mlp.down_proj",
    window_layers="layer_types_or_all",
)
GPT2 = Family(
    name="gpt2", model_types=("gpt2",), label="GPT-2",
    base="transformer", token_embed="wte", position_embed="wpe", layers="h", final_norm="ln_f",
    attention="attn", out_proj="attn.c_proj",
    mlp_in="ln_2", mlp="mlp", down_proj="mlp.c_proj",
)
GPT_NEOX = Family(
    name="gpt_neox", model_types=("gpt_neox",), label="GPT-NeoX/Pythia",
    base="gpt_neox", token_embed="embed_in", rotary="rotary_emb", layers="layers", final_norm="final_layer_norm",
    attention="attention", out_proj="attention.dense",
    mlp_in="post_attention_layernorm", mlp="mlp", down_proj="mlp.dense_4h_to_h",
    parallel_residual=True,
)
# fmt: on
# Gemma-2/3: norms before and after attention and MLP; the MLP's input norm has its own name.
_GEMMA = replace(
    LLAMA,
    mlp_in="pre_feedforward_layernorm",
    attn_post_norm="post_attention_layernorm",
    mlp_post_norm="post_feedforward_layernorm",
    window_layers="layer_types",
)

FAMILIES: tuple[Family, ...] = (
    GPT2,
    GPT_NEOX,
    LLAMA,
    replace(LLAMA, name="qwen3", model_types=("qwen3",), label="Qwen3 (per-head QK-norm)", window_layers="layer_types"),
    replace(
        LLAMA, name="phi3", model_types=("phi3",), label="Phi-3 (fused qkv_proj and gate_up_proj)", window_layers="all"
    ),
    replace(
        LLAMA,
        name="olmo2",
        model_types=("olmo2",),
        label="OLMo-2 (QK-norm over the whole projection, norms after attention and MLP)",
        mlp_in="mlp",  # no norm in front of the MLP
        attn_post_norm="post_attention_layernorm",
        mlp_post_norm="post_feedforward_layernorm",
        window_layers="none",
    ),
    replace(
        _GEMMA,
        name="gemma2",
        model_types=("gemma2",),
        label="Gemma-2 (score and logit soft-caps, alternating sliding windows)",
        score_softcap="attn_logit_softcapping",
        logit_softcap="final_logit_softcapping",
    ),
    replace(
        _GEMMA,
        name="gemma3",
        model_types=("gemma3_text",),
        label="Gemma-3 text (sliding-window pattern, local/global rotary, QK-norm)",
        logit_softcap="final_logit_softcapping",
        rotary_per_layer_type=True,
    ),
)

SUPPORTED = sorted(t for family in FAMILIES for t in family.model_types)

# Families refused on purpose, with the feature the engine does not compute.
_REFUSED_FEATURES: dict[str, str] = {
    "mixtral": "mixture-of-experts MLP (token routing)",
    "qwen2_moe": "mixture-of-experts MLP (token routing)",
    "qwen3_moe": "mixture-of-experts MLP (token routing)",
    "olmoe": "mixture-of-experts MLP (token routing)",
    "phimoe": "mixture-of-experts MLP (token routing)",
    "dbrx": "mixture-of-experts MLP (token routing)",
    "deepseek_v2": "mixture-of-experts MLP and latent attention",
    "deepseek_v3": "mixture-of-experts MLP and latent attention",
    "gpt_oss": "mixture-of-experts MLP and attention sinks",
    "gemma3": "image+text model: load its text part (Gemma3ForCausalLM, model type gemma3_text)",
    "t5": "encoder-decoder (cross-attention)",
    "bart": "encoder-decoder (cross-attention)",
    "mbart": "encoder-decoder (cross-attention)",
    "whisper": "encoder-decoder (cross-attention)",
}


def supported_text() -> str:
    """One line per family: its model types and what it covers."""
    return "\n".join(f"  {', '.join(f.model_types)}: {f.label}" for f in FAMILIES)


def get_path(root: Any, path: str, family: Family | None = None, field: str = "") -> Any:
    """Follow a dotted attribute path; a missing part names the family and the field at fault."""
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            where = f"family {family.name!r} field {field!r}" if family is not None else "path"
            raise UnsupportedModelError(
                f"{where}: {type(root).__name__} has no {path!r} ({type(obj).__name__} lacks {part!r}); "
                "the model's layout differs from the family table (a different transformers version?)"
            )
        obj = getattr(obj, part)
    return obj


def family_of(hf_model_or_config: Any) -> Family:
    """The family row for a model (or its config), or a clear error naming the supported ones."""
    config = getattr(hf_model_or_config, "config", hf_model_or_config)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            check_attention_features(config, family)
            return family
    missing = _REFUSED_FEATURES.get(str(model_type))
    experts = [getattr(config, name, None) for name in ("num_local_experts", "num_experts")]
    if missing is None and any(experts):
        missing = "mixture-of-experts MLP (token routing)"
    if missing is None and getattr(config, "is_encoder_decoder", False):
        missing = "encoder-decoder (cross-attention)"
    feature = f" (not implemented: {missing})" if missing else ""
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported{feature}; supported families (config.model_type):\n"
        f"{supported_text()}"
    )


def check_attention_features(config: Any, family: Family) -> None:
    """Refuse attention variants the engine does not compute exactly."""
    name = config.model_type
    if getattr(config, "add_cross_attention", False) or getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name}: cross-attention / encoder-decoder models are not supported")
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(f"{name}: bidirectional attention is not supported (causal models only)")
    if family.window_layers == "none" and _window(config) is not None:
        raise UnsupportedModelError(f"{name}: sliding_window is not implemented for this family")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise UnsupportedModelError(
                f"{name}: layer types {unknown} are not implemented (supported: full_attention, sliding_attention)"
            )


def _window(config: Any) -> int | None:
    if getattr(config, "use_sliding_window", True) is False:
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


def layer_attention(family: Family, config: Any, attention_module: Any, layer: int) -> LayerAttention:
    """The attention arguments of one layer, from the config (and the module's own ``scaling``)."""
    layer_types = getattr(config, "layer_types", None)
    layer_type = layer_types[layer] if layer_types is not None else None
    mode = family.window_layers
    if mode == "layer_types_or_all":  # Qwen2 writes layer_types; Mistral applies its window everywhere
        mode = "layer_types" if layer_types is not None else "all"
    window = None
    if mode == "all" or (mode == "layer_types" and layer_type == "sliding_attention"):
        window = _window(config)
    softcap = getattr(config, family.score_softcap, None) if family.score_softcap else None
    scaling = getattr(attention_module, "scaling", None)
    if scaling is None:
        raise UnsupportedModelError(
            f"family {family.name!r} field 'attention': {type(attention_module).__name__} has no 'scaling'"
        )
    return LayerAttention(
        scaling=float(scaling),
        window=window,
        softcap=float(softcap) if softcap else None,
        rotary=layer_type if family.rotary_per_layer_type else None,
    )


def embed(family: Family, hf_model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Residual stream entering layer 0 for token ids [B, T] at positions 0..T-1."""
    base = get_path(hf_model, family.base, family, "base")
    hidden = get_path(base, family.token_embed, family, "token_embed")(ids)
    if family.position_embed is not None:
        positions = torch.arange(ids.shape[1], device=ids.device)
        hidden = hidden + get_path(base, family.position_embed, family, "position_embed")(positions)[None].to(
            hidden.device
        )
    return hidden
