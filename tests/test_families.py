"""The newer families (Gemma-2, Gemma-3, Qwen2, Qwen3, Mistral, Phi-3, OLMo-2) with their features on.

Tiny random float64 models from ``transformers`` configs (``reference.models.NEW_FAMILIES``):
windows of 3 on prompts of 6, Gemma-2's score soft-cap 1.5 and logit soft-cap 4 (both binding),
Gemma-3's local/global rotary tables, QK-norms, Qwen2's biases, Phi-3's fused projections, saturated
heads. Every estimator is compared with the brute-force references (hooks on the plain model; the
softmax-row brute force for the QK fix; L separate dropped backwards for GradDrop).
"""

from __future__ import annotations

import pytest
import torch

import atpstar
from reference import brute, hooks
from reference.models import NEW_FAMILIES, assert_rel_close, build_hf, load, make_pairs

ALL = ["neuron", "query", "key", "value", "head"]
REL = 1e-9  # float64 throughout; the observed agreement is ~1e-15


@pytest.fixture(scope="module")
def new_models() -> dict[str, torch.nn.Module]:
    return {f: build_hf(f) for f in NEW_FAMILIES}


@pytest.fixture(params=NEW_FAMILIES)
def new_family(request) -> str:
    return request.param


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_wrapped_logits_equal_the_models_own_forward(new_family, dtype, rel):
    """Against the model's default attention (eager for Gemma-2) with its own norms, and float64 eager."""
    hf = build_hf(new_family, dtype=dtype, exact_norm=False)
    tokens = make_pairs(n_pairs=3, seq_len=7).clean
    with torch.no_grad():
        own = hf(tokens).logits
        wrapped = load(hf).logits(tokens)
        eager64 = hooks.reference_copy(hf)(tokens).logits
    assert wrapped.dtype == dtype
    # Gemma-2 runs eager attention by default, whose softmax is float32 even for float64 models.
    assert_rel_close(wrapped, own, max(rel, 1e-6 if new_family == "gemma2" else rel), "own forward")
    assert_rel_close(wrapped, eager64, rel, "eager")


def test_features_are_on_and_change_the_model(new_family, new_models):
    """The features are switched on, and each one changes the logits: the tests below can fail."""
    hf = new_models[new_family]
    model = load(hf)
    args = model.attention_args
    expected_windows = {
        "gemma2": [3, None], "gemma3": [3, None], "qwen2": [None, 3], "qwen3": [None, 3],
        "mistral": [3, 3], "phi3": [3, 3], "olmo2": [None, None],
    }[new_family]
    assert [a.window for a in args] == expected_windows
    assert [a.softcap for a in args] == ([1.5, 1.5] if new_family == "gemma2" else [None, None])
    assert model.logit_softcap == (4.0 if new_family in ("gemma2", "gemma3") else None)
    if new_family == "gemma3":
        assert [a.rotary for a in args] == ["sliding_attention", "full_attention"]
        assert args[0].scaling == 10**-0.5
    tokens = make_pairs(seq_len=6).clean
    with torch.no_grad():
        plain = model.logits(tokens)
        if any(a.window for a in args):
            hf_no_window = build_hf(new_family, sliding_window=100)
            assert float((load(hf_no_window).logits(tokens) - plain).abs().max()) > 1e-3
        if new_family == "gemma2":
            for field in ("attn_logit_softcapping", "final_logit_softcapping"):
                changed = load(build_hf(new_family, **{field: 1e4})).logits(tokens)
                assert float((changed - plain).abs().max()) > 1e-3, field


def test_activation_patching_matches_hook_reference(new_family, new_models):
    """batch_size 40: most patched forwards start late, so windowed layers read a prefix cache trimmed
    to the window (the default batch holds every node of a layer and starts at position 0)."""
    hf = new_models[new_family]
    pairs = make_pairs()
    expected = hooks.exact_patching(hooks.reference_copy(hf), pairs, "noising")
    model = load(hf)
    for batch_size in (None, 40):
        result = atpstar.attribute(model, pairs, method="activation_patching", nodes=ALL, batch_size=batch_size)
        for t in ALL:
            assert float(expected[t].abs().max()) > 1e-2, f"{t}: vacuous reference"
            assert_rel_close(result.per_pair[t], expected[t], REL, f"{new_family} batch {batch_size} {t}")


@pytest.mark.parametrize("direction", ["noising", "denoising"])
def test_atp_matches_hook_reference(new_family, new_models, direction):
    hf = new_models[new_family]
    pairs = make_pairs()
    expected = hooks.atp(hooks.reference_copy(hf), pairs, direction)
    result = atpstar.attribute(load(hf), pairs, method="atp", nodes=ALL, direction=direction)
    for t in ALL:
        assert_rel_close(result.per_pair[t], expected[t], REL, f"{new_family} {direction} {t}")


def test_qkfix_and_graddrop_match_brute_force(new_family, new_models):
    """atp+qkfix, atp+graddrop and atp* against the softmax-row brute force and L dropped backwards."""
    model = load(new_models[new_family])
    pairs = make_pairs()
    fixed = brute.atp(model, pairs, ALL, qk_fix=True)
    result = atpstar.attribute(model, pairs, method="atp+qkfix", nodes=ALL)
    for t in ALL:
        assert_rel_close(result.per_pair[t], fixed[t], REL, f"{new_family} qkfix {t}")
    plain = atpstar.attribute(model, pairs, method="atp", nodes=["key"]).per_pair["key"]
    assert float((result.per_pair["key"] - plain).abs().max()) > 1e-3, "the fix should matter on saturated heads"
    for method, qk_fix in (("atp+graddrop", False), ("atp*", True)):
        expected = brute.graddrop(model, pairs, ALL, qk_fix=qk_fix)
        result = atpstar.attribute(model, pairs, method=method, nodes=ALL)
        for t in ALL:
            assert_rel_close(result.per_pair[t], expected[t], REL, f"{new_family} {method} {t}")
