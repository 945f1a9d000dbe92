"""Tiny random models of the three families (float64, some heads saturated) and pairs.

Shared by the tests (through ``conftest`` fixtures and by import). Every model is built offline from a ``transformers`` config. Weights are drawn with a larger
initializer range than the default so metrics and effects are O(1), and the query/key projections
of some heads are scaled so that their attention patterns saturate (probabilities ~1 and ~1e-10).
"""

from __future__ import annotations

import warnings

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

import atpstar
from atpstar.testing import VOCAB, assert_unchanged, snapshot, tiny_pairs  # noqa: F401  (re-exported)

torch.set_num_threads(1)  # tiny tensors: threading overhead dominates on small CPUs

N_CTX = 16
FAMILIES = ("gpt2", "gpt_neox", "llama")
# The newer families, each with its features switched on: windows of 3 on prompts of 6,
# soft-caps that bind, QK-norms; built by ``make_config`` like the three above.
NEW_FAMILIES = ("gemma2", "gemma3", "qwen2", "qwen3", "mistral", "phi3", "olmo2")
WINDOW = 3


def make_config(family: str, n_layers: int = 2, **overrides):
    """A tiny config: d_model 32, 4 heads (Llama: 2 kv heads), d_mlp 32."""
    if family == "gpt2":
        cfg = GPT2Config(
            vocab_size=VOCAB, n_positions=N_CTX, n_embd=32, n_layer=n_layers, n_head=4, n_inner=32,
            initializer_range=0.25, bos_token_id=None, eos_token_id=None,
        )
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(
            vocab_size=VOCAB, max_position_embeddings=N_CTX, hidden_size=32, num_hidden_layers=n_layers,
            num_attention_heads=4, intermediate_size=32, use_parallel_residual=True, initializer_range=0.25,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            tie_word_embeddings=False,
        )
    elif family == "llama":
        cfg = LlamaConfig(
            vocab_size=VOCAB, max_position_embeddings=N_CTX, hidden_size=32, num_hidden_layers=n_layers,
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=32, initializer_range=0.25,
        )
    else:
        cfg = _new_family_config(family, n_layers)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _new_family_config(family: str, n_layers: int):
    """Tiny configs of the newer families: d_model 32, 4 heads, 2 kv heads, d_head 8, d_mlp 32."""
    common = dict(
        vocab_size=VOCAB, max_position_embeddings=N_CTX, hidden_size=32, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=32, initializer_range=0.25,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
    )
    # Alternate sliding and full layers, starting with a sliding one (Gemma-2's own pattern).
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    if family == "gemma2":
        return Gemma2Config(**common, head_dim=8, query_pre_attn_scalar=6, sliding_window=WINDOW,
                            attn_logit_softcapping=1.5, final_logit_softcapping=4.0, layer_types=alternating,
                            hidden_activation="gelu_pytorch_tanh")
    if family == "gemma3":
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1000.0, "factor": 4.0}}
        return Gemma3TextConfig(**common, head_dim=8, query_pre_attn_scalar=10, sliding_window=WINDOW,
                                layer_types=alternating, rope_parameters=rope, final_logit_softcapping=4.0)
    if family == "qwen2":  # q/k/v biases; windows on layers >= max_window_layers
        return Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=8, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=WINDOW)
    if family == "phi3":
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        return Phi3Config(**common, sliding_window=WINDOW, rope_parameters=rope, pad_token_id=None)
    if family == "olmo2":
        return Olmo2Config(**common)
    raise ValueError(family)


def qk_weights(hf_model, family: str, layer: int):
    """(query rows getter, key rows getter) as functions head -> weight view to scale in place."""
    if family == "gpt2":
        attn = hf_model.transformer.h[layer].attn
        d, e = attn.embed_dim, attn.head_dim
        w = attn.c_attn.weight  # Conv1D: [D, 3D], columns q|k|v
        return (lambda h: w[:, h * e:(h + 1) * e]), (lambda g: w[:, d + g * e:d + (g + 1) * e])
    if family == "gpt_neox":
        attn = hf_model.gpt_neox.layers[layer].attention
        e = attn.head_size
        w = attn.query_key_value.weight  # Linear: [3D, D], rows per head [q | k | v]
        return (lambda h: w[h * 3 * e:h * 3 * e + e]), (lambda g: w[g * 3 * e + e:g * 3 * e + 2 * e])
    attn = hf_model.model.layers[layer].self_attn
    e = attn.head_dim
    if family == "phi3":  # fused rows [q heads | k heads | v heads]
        w, d_q = attn.qkv_proj.weight, hf_model.config.num_attention_heads * e
        return (lambda h: w[h * e:(h + 1) * e]), (lambda g: w[d_q + g * e:d_q + (g + 1) * e])
    if family == "olmo2":  # the norm after the projection would undo a scaled projection; scale its weight
        return (lambda h: attn.q_norm.weight[h * e:(h + 1) * e]), (lambda g: attn.k_norm.weight[g * e:(g + 1) * e])
    return (lambda h: attn.q_proj.weight[h * e:(h + 1) * e]), (lambda g: attn.k_proj.weight[g * e:(g + 1) * e])


def saturate(hf_model, family: str, layer: int, head: int, factor: float) -> None:
    """Scale query head ``head`` and its key head by sqrt(factor) each: logits scale by ``factor``."""
    if family in ("qwen3", "gemma3"):
        # Per-head QK-norm weights are shared by all heads: every head of the layer saturates.
        attn = hf_model.model.layers[layer].self_attn
        with torch.no_grad():
            for norm in (attn.q_norm, attn.k_norm):
                if family == "gemma3":  # Gemma norms scale by (1 + weight)
                    norm.weight.copy_((1 + norm.weight) * factor**0.5 - 1)
                else:
                    norm.weight.mul_(factor**0.5)
        return
    q_rows, k_rows = qk_weights(hf_model, family, layer)
    n_heads = hf_model.config.num_attention_heads
    n_kv = getattr(hf_model.config, "num_key_value_heads", None) or n_heads
    if family == "qwen2":  # the biases scale with the weights so the logits scale by ``factor``
        attn = hf_model.model.layers[layer].self_attn
        e = attn.head_dim
        g = head // (n_heads // n_kv)
        with torch.no_grad():
            attn.q_proj.bias[head * e:(head + 1) * e].mul_(factor**0.5)
            attn.k_proj.bias[g * e:(g + 1) * e].mul_(factor**0.5)
    with torch.no_grad():
        q_rows(head).mul_(factor**0.5)
        k_rows(head // (n_heads // n_kv)).mul_(factor**0.5)


class ExactRMSNorm(torch.nn.Module):
    """RMSNorm in the input's own precision.

    transformers' ``LlamaRMSNorm`` computes in float32 even for float64 models (``.to(torch.float32)``),
    which adds ~1e-8 relative noise to every forward: harmless for comparisons that share the module,
    fatal for finite differences. Tests swap it for this one (same weight and epsilon).
    """

    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = getattr(norm, "variance_epsilon", None) or norm.eps
        self.offset = 1.0 if type(norm).__name__.startswith("Gemma") else 0.0  # Gemma scales by (1 + weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return (self.offset + self.weight) * hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)


def use_exact_norms(hf_model) -> None:
    for name, module in list(hf_model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child).__name__.endswith("RMSNorm"):
                setattr(module, child_name, ExactRMSNorm(child))


def build_hf(family: str, n_layers: int = 2, seed: int = 0, dtype=torch.float64, saturated: bool = True,
             exact_norm: bool = True, **overrides):
    """A tiny random model in eval mode; ``exact_norm`` swaps Llama's float32 RMSNorm for a float64 one."""
    torch.manual_seed(seed)
    cfg = make_config(family, n_layers, **overrides)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    if exact_norm:
        use_exact_norms(model)
    if saturated:
        # Layer 0 head 1 and last layer head 2 get logits ~20x larger: patterns near one-hot.
        saturate(model, family, 0, 1, 20.0)
        saturate(model, family, n_layers - 1, 2, 25.0)
    return model


def load(hf_model) -> atpstar.Model:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an eval-mode model must load without warnings
        return atpstar.load_model(hf_model)


def make_pairs(n_pairs: int = 2, seq_len: int = 6, seed: int = 1, metric="logit_diff") -> atpstar.PromptPairs:
    """Random pairs over ``VOCAB`` whose noise differs at two positions (one early, one late), as in IOI-style pairs."""
    return tiny_pairs(n_pairs=n_pairs, seq_len=seq_len, seed=seed, metric=metric)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "") -> None:
    """max |actual - expected| <= rel * max(|expected|) (plus a float64 floor), and no NaN/inf."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = float(expected.abs().max())
    err = float((actual - expected).abs().max())
    assert err <= rel * scale + 1e-13, f"{what}: max abs error {err:.3e} > {rel:g} x scale {scale:.3e}"
