"""The wrapped model: same logits as the plain model, refuses what it cannot run, leaves no trace."""

from __future__ import annotations

import warnings

import pytest
import torch

import atpstar
from atpstar.runner import Run
from reference.models import FAMILIES, VOCAB, assert_unchanged, build_hf, load, make_pairs, snapshot


@pytest.mark.parametrize("exact_norm", [True, False])
@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_wrapped_logits_equal_plain_logits(family, dtype, rel, exact_norm):
    hf = build_hf(family, dtype=dtype, exact_norm=exact_norm)
    model = load(hf)
    tokens = make_pairs(n_pairs=3, seq_len=7).clean
    with torch.no_grad():
        expected = hf(tokens).logits
        actual = model.logits(tokens)
    assert actual.dtype == dtype
    scale = float(expected.abs().max())
    assert float((actual - expected).abs().max()) <= rel * scale


def test_gpt2_layer_scaled_attention_logits():
    """GPT-2's scale_attn_by_inverse_layer_idx changes the softmax scaling per layer; it must be honoured."""
    hf = build_hf("gpt2", n_layers=3, scale_attn_by_inverse_layer_idx=True)
    tokens = make_pairs(seq_len=7).clean
    with torch.no_grad():
        expected = hf(tokens).logits
        actual = load(hf).logits(tokens)
    assert float((actual - expected).abs().max()) <= 1e-12 * float(expected.abs().max())


def test_sizes(family, hf_model):
    model = load(hf_model)
    assert (model.n_layers, model.n_heads, model.d_head, model.d_mlp) == (2, 4, 8, 32)
    assert model.n_kv_heads == (2 if family == "llama" else 4)


def test_unsupported_family_names_supported_ones():
    from transformers import BertConfig, BertLMHeadModel

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, is_decoder=True)
    with pytest.raises(atpstar.UnsupportedModelError) as err:
        atpstar.load_model(BertLMHeadModel(cfg))
    for name in ("gpt2", "gpt_neox", "llama"):
        assert name in str(err.value)
    assert "bert" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_sliding_window_shorter_than_prompt_matches_model():
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=3, initializer_range=0.25)
    hf = AutoModelForCausalLM.from_config(cfg).double().eval()
    model = atpstar.load_model(hf)
    assert [a.window for a in model.attention_args] == [3, 3]
    tokens = make_pairs(seq_len=7).clean
    with torch.no_grad():
        expected = hf(tokens).logits
        actual = model.logits(tokens)
    assert float((actual - expected).abs().max()) <= 1e-6 * float(expected.abs().max())
    # Without the window the logits differ: the test above can fail.
    hf.config.sliding_window = None
    with torch.no_grad():
        assert float((atpstar.load_model(hf).logits(tokens) - expected).abs().max()) > 1e-3


def test_training_mode_switched_with_warning_then_refused():
    hf = build_hf("gpt2")
    hf.train()
    with pytest.warns(UserWarning, match="eval"):
        model = atpstar.load_model(hf)
    assert not hf.training
    assert not any(m.training for m in hf.modules())
    hf.train()
    with pytest.raises(atpstar.InputError, match="training"):
        atpstar.attribute(model, make_pairs(), method="atp", nodes=["head"])


def test_eval_model_loads_without_warning(hf_model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        atpstar.load_model(hf_model)


@pytest.mark.parametrize("method", ["activation_patching", "atp*"])
def test_model_unchanged_after_attribute(family, method):
    hf = build_hf(family)
    # A frozen parameter must stay frozen and a trainable one trainable.
    next(hf.parameters()).requires_grad_(False)
    before = snapshot(hf)
    with torch.no_grad():
        logits_before = hf(make_pairs().clean).logits
    atpstar.attribute(load(hf), make_pairs(), method=method, nodes=["neuron", "key", "head"])
    assert_unchanged(hf, before)
    with torch.no_grad():
        assert torch.equal(hf(make_pairs().clean).logits, logits_before)


@pytest.mark.parametrize("method", ["activation_patching", "atp", "atp*"])
def test_model_unchanged_after_error_in_metric(method):
    hf = build_hf("llama")
    before = snapshot(hf)
    calls = []

    def failing(logits, answer, distractor):
        calls.append(1)
        if len(calls) > 1 or method != "activation_patching":
            raise RuntimeError("metric failed")
        return logits[:, 0]

    pairs = make_pairs(metric=failing)
    with pytest.raises(RuntimeError, match="metric failed"):
        atpstar.attribute(load(hf), pairs, method=method, nodes=["neuron", "query"])
    assert_unchanged(hf, before)


def test_model_unchanged_after_error_inside_forward(family):
    """An exception raised mid-forward (inside a layer) still restores attention and removes hooks."""
    hf = build_hf(family)
    before = snapshot(hf)
    model = load(hf)

    def boom(layer, site, x, run):
        if layer == 1 and site in ("neuron", "k"):
            raise RuntimeError("boom")
        return x

    with pytest.raises(RuntimeError, match="boom"):
        model.run_layers(model.embed(make_pairs().clean), Run(model.n_layers, record=("neuron",), patch=boom))
    assert_unchanged(hf, before)
    with torch.no_grad():
        hf(make_pairs().clean)  # the plain model still runs on its own attention


def test_runner_records_shapes(family, hf_model):
    model = load(hf_model)
    tokens = make_pairs(n_pairs=2, seq_len=5).clean
    run = Run(model.n_layers, record=("q", "k", "v", "pattern", "z", "neuron", "resid_pre"))
    with torch.no_grad():
        model.run_layers(model.embed(tokens), run)
    h, k, e = model.n_heads, model.n_kv_heads, model.d_head
    assert run.records["q"][1].shape == (2, h, 5, e)
    assert run.records["k"][1].shape == (2, k, 5, e)
    assert run.records["v"][0].shape == (2, k, 5, e)
    assert run.records["z"][0].shape == (2, h, 5, e)
    assert run.records["pattern"][0].shape == (2, h, 5, 5)
    assert run.records["neuron"][1].shape == (2, 5, model.d_mlp)
    assert len(run.records["resid_pre"]) == model.n_layers + 1
    pattern = run.records["pattern"][0]
    assert torch.allclose(pattern.sum(-1), torch.ones((), dtype=pattern.dtype))
    assert float(pattern.triu(1).abs().max()) == 0.0  # causal
    assert abs(run.scaling[0] - e**-0.5) < 1e-15


@pytest.mark.parametrize("family_name", FAMILIES)
def test_saturated_heads_are_saturated(family_name):
    """The fixture models really have near-one-hot heads (else the QK-fix tests test nothing)."""
    model = load(build_hf(family_name))
    run = Run(model.n_layers, record=("pattern",))
    with torch.no_grad():
        model.run_layers(model.embed(make_pairs().clean), run)
    pattern = run.records["pattern"][0][:, 1, 1:]  # layer 0 head 1, rows with >1 visible key
    assert float(pattern.max(-1).values.max()) > 1 - 1e-9  # some row is one-hot to float64 precision
    visible = torch.ones(pattern.shape[-2:], dtype=torch.bool).tril(1)
    assert float(pattern[..., visible].min()) < 1e-10


def test_mixture_of_experts_refused_with_supported_list_and_missing_feature():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2)
    with pytest.raises(atpstar.UnsupportedModelError) as err:
        atpstar.load_model(MixtralForCausalLM(cfg))
    message = str(err.value)
    assert "mixture-of-experts" in message and "mixtral" in message
    for name in ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2"):
        assert name in message, name


def test_encoder_decoder_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    with pytest.raises(atpstar.UnsupportedModelError, match="encoder-decoder"):
        atpstar.load_model(T5ForConditionalGeneration(cfg))


def test_wrong_module_path_names_family_and_field():
    from dataclasses import replace

    from atpstar.families import FAMILIES, get_path
    from atpstar.model_hooks import layer_parts

    llama = next(f for f in FAMILIES if f.name == "llama")
    broken = replace(llama, down_proj="mlp.c_proj")
    hf = build_hf("llama")
    with pytest.raises(atpstar.UnsupportedModelError, match=r"family 'llama' field 'down_proj'.*'c_proj'"):
        get_path(hf.model.layers[0], broken.down_proj, broken, "down_proj")
    with pytest.raises(atpstar.UnsupportedModelError, match=r"family 'llama' field 'down_proj'.*'c_proj'"):
        layer_parts(broken, hf.model.layers[0], parallel=False)  # what Model resolves for its sites
