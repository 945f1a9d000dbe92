"""Verification in estimate order: exact effects, order, stopping rules, cost."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import atpstar
from atpstar.nodes import node_name
from atpstar.verify import Verification, verify

NODES = ["neuron", "query", "key", "value", "head"]


def gpt2_toy(seed: int = 0, n_pairs: int = 3, seq_len: int = 5):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=4, n_inner=12, n_positions=16, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, initializer_range=0.2)
    g = torch.Generator().manual_seed(seed + 1)
    tokens = lambda *shape: torch.randint(0, 40, shape, generator=g)  # noqa: E731
    clean, noise = tokens(n_pairs, seq_len), tokens(n_pairs, seq_len)
    answer, distractor = tokens(n_pairs), tokens(n_pairs)
    distractor = torch.where(distractor == answer, (answer + 1) % 40, distractor)  # a competitor, not the answer
    pairs = atpstar.PromptPairs(clean, noise, answer, distractor)
    return atpstar.Model(GPT2LMHeadModel(config).double().eval()), pairs


@pytest.fixture(scope="module")
def setting():
    model, pairs = gpt2_toy()
    truth = atpstar.attribute(model, pairs, "activation_patching", nodes=NODES)
    estimate = atpstar.attribute(model, pairs, "atp", nodes=NODES)
    return model, pairs, truth, estimate


def test_effects_equal_activation_patching_in_estimate_order(setting):
    model, pairs, truth, estimate = setting
    result = verify(model, pairs, estimate, budget=40, batch_size=7)
    assert isinstance(result, Verification) and result.n_verified == 40
    expected_order = [(node.node_type, node.index) for node in estimate.top(40)]
    assert result.nodes == expected_order
    exact = torch.stack([truth.per_pair[t][(slice(None), *index)] for t, index in result.nodes])  # [N, P]
    torch.testing.assert_close(result.effects, exact, rtol=0, atol=1e-13)
    torch.testing.assert_close(result.mean_effects, exact.mean(1))
    assert result.names == [node_name(t, index) for t, index in result.nodes]
    rows = result.to_rows()
    assert rows[0]["rank"] == 1 and rows[0]["name"] == result.names[0] and len(rows) == 40
    assert rows[3]["effect"] == pytest.approx(float(exact[3].mean()))
    assert result.direction == "noising" and result.node_types == NODES
    # 2P base/source forwards, then one forward per node and pair started at its layer (L = 2)
    layers = torch.tensor([index[0] for _, index in result.nodes], dtype=torch.float64)
    assert result.cost.forward == pytest.approx(2 * 3 + 3 * float(((2 - layers) / 2).sum()))
    again = verify(model, pairs, estimate, budget=40)
    torch.testing.assert_close(again.effects, result.effects, rtol=0, atol=1e-14)


def test_threshold_stops_when_the_estimate_score_drops_below(setting):
    model, pairs, truth, estimate = setting
    scores = torch.cat([estimate.scores[t].flatten() for t in NODES]).abs().sort(descending=True).values
    threshold = float(scores[12] + scores[13]) / 2
    result = verify(model, pairs, estimate, threshold=threshold)
    assert result.n_verified == 13
    assert result.estimate_scores.abs().min() >= threshold
    assert verify(model, pairs, estimate, threshold=threshold, budget=5).n_verified == 5


def test_verifying_everything_in_any_order_is_activation_patching(setting):
    model, pairs, truth, _ = setting
    result = verify(model, pairs, truth)  # the truth as its own estimate: oracle order
    assert result.n_verified == sum(v.numel() for v in truth.scores.values())
    torch.testing.assert_close(result.mean_effects.abs(), result.estimate_scores.abs(), rtol=0, atol=1e-13)
    assert result.cost.forward == pytest.approx(truth.cost.forward)


def test_denoising_direction_from_estimate(setting):
    model, pairs, _, _ = setting
    truth = atpstar.attribute(model, pairs, "activation_patching", nodes=["head"], direction="denoising")
    estimate = atpstar.attribute(model, pairs, "atp", nodes=["head"], direction="denoising")
    result = verify(model, pairs, estimate, budget=6)
    assert result.direction == "denoising"
    exact = torch.stack([truth.per_pair[t][(slice(None), *index)] for t, index in result.nodes])
    torch.testing.assert_close(result.effects, exact, rtol=0, atol=1e-13)


def test_bad_input(setting):
    model, pairs, _, estimate = setting
    with pytest.raises(atpstar.InputError, match="budget"):
        verify(model, pairs, estimate, budget=-1)
    with pytest.raises(atpstar.InputError, match="Attribution"):
        verify(model, pairs, {"head": torch.zeros(3)})
    longer = atpstar.PromptPairs(torch.zeros(1, 7, dtype=torch.long), torch.ones(1, 7, dtype=torch.long), [1], [2])
    with pytest.raises(atpstar.InputError, match="shape"):
        verify(model, longer, estimate, budget=3)


def test_save_load_round_trip(setting, tmp_path):
    model, pairs, _, estimate = setting
    result = verify(model, pairs, estimate, budget=7)
    result.info["pairs_fingerprint"] = pairs.fingerprint()
    result.save(tmp_path / "sub" / "verified")
    assert (tmp_path / "sub" / "verified.json").is_file() and (tmp_path / "sub" / "verified.safetensors").is_file()
    for path in (tmp_path / "sub" / "verified", str(tmp_path / "sub" / "verified.json")):
        loaded = Verification.load(path)
        assert isinstance(loaded, Verification)
        assert loaded.nodes == result.nodes and loaded.names == result.names
        torch.testing.assert_close(loaded.effects, result.effects, rtol=0, atol=0)
        torch.testing.assert_close(loaded.estimate_scores, result.estimate_scores, rtol=0, atol=0)
        torch.testing.assert_close(loaded.base_metric, result.base_metric, rtol=0, atol=0)
        assert (loaded.node_types, loaded.direction, loaded.metric, loaded.model_id) == \
            (result.node_types, result.direction, result.metric, result.model_id)
        assert loaded.cost == result.cost and loaded.info == result.info
    with pytest.raises(atpstar.InputError, match="no saved verification"):
        Verification.load(tmp_path / "missing")
    (tmp_path / "sub" / "verified.json").write_text('{"nodes": []}')
    with pytest.raises(atpstar.InputError, match="not a saved verification"):
        Verification.load(tmp_path / "sub" / "verified")
