"""Subsampling (Algorithm 1) and the joint-patching engine it runs on (engine.patch_masks)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

import atpstar
from atpstar import engine
from atpstar.cost import Cost
from atpstar.nodes import NODE_TABLE, node_shape
from atpstar.runner import Run

TYPES = ["neuron", "query", "key", "value", "head"]


def additive_toy(n_layers: int = 1, seed: int = 0, n_pairs: int = 2, seq_len: int = 4):
    """GPT-NeoX with parallel residual and the final norm replaced by identity, float64.

    With one layer, neuron, head and value nodes reach the logit difference linearly: effects add up
    exactly (mixing head and value nodes of one head does not: a patched head output hides its values).
    """
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=30, hidden_size=8, num_hidden_layers=n_layers, num_attention_heads=2,
                           intermediate_size=8, max_position_embeddings=16, use_parallel_residual=True,
                           hidden_dropout=0.0, attention_dropout=0.0, initializer_range=0.3)
    hf_model = GPTNeoXForCausalLM(config).double().eval()
    hf_model.gpt_neox.final_layer_norm = torch.nn.Identity()
    return atpstar.Model(hf_model), random_pairs(seed, n_pairs, seq_len, 30)


def gpt2_toy(seed: int = 0, n_pairs: int = 3, seq_len: int = 5):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=4, n_inner=12, n_positions=16, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return atpstar.Model(GPT2LMHeadModel(config).double().eval()), random_pairs(seed, n_pairs, seq_len, 40)


def random_pairs(seed: int, n_pairs: int, seq_len: int, vocab: int) -> atpstar.PromptPairs:
    g = torch.Generator().manual_seed(seed + 1)
    tokens = lambda *shape: torch.randint(0, vocab, shape, generator=g)  # noqa: E731
    return atpstar.PromptPairs(tokens(n_pairs, seq_len), tokens(n_pairs, seq_len), tokens(n_pairs), tokens(n_pairs))


# Joint patching -----------------------------------------------------------------------------------------


def test_patch_masks_single_node_equals_patch_node_batch():
    model, pairs = gpt2_toy()
    cache = engine.prepare(model, pairs, "noising", TYPES, Cost())
    shapes = {t: node_shape(t, model.sizes, pairs.seq_len) for t in TYPES}
    pair_i = torch.arange(pairs.n_pairs)
    for t in TYPES:
        for layer, unit, pos in [(0, 1, 0), (1, 0, 3), (1, 1, 4), (0, 0, 2)]:
            single = engine.patch_node_batch(model, cache, layer, [t], torch.zeros_like(pair_i), pair_i,
                                             torch.full_like(pair_i, unit), torch.full_like(pair_i, pos), Cost())
            mask = torch.zeros(pairs.n_pairs, *shapes[t], dtype=torch.bool)
            mask[(slice(None), layer, pos, unit) if t == "neuron" else (slice(None), layer, unit, pos)] = True
            joint = engine.patch_masks(model, cache, {t: mask}, pair_i, Cost())
            torch.testing.assert_close(joint, single, rtol=0, atol=1e-14)


def test_patch_masks_equals_brute_force_joint_patch():
    """Random node sets over all types, later-layer-only and later-position-only sets, vs a full forward."""
    model, pairs = gpt2_toy()
    cache = engine.prepare(model, pairs, "noising", TYPES, Cost())
    shapes = {t: node_shape(t, model.sizes, pairs.seq_len) for t in TYPES}
    g = torch.Generator().manual_seed(3)
    pair_i = torch.tensor([0, 2, 1, 1, 0, 2])
    masks = {t: torch.rand(len(pair_i), *shapes[t], generator=g) < 0.3 for t in TYPES}
    late = {t: m.clone() for t, m in masks.items()}
    for t, m in late.items():
        m[:, 0] = False
        if t == "neuron":
            m[:, :, :2] = False
        else:
            m[:, :, :, :2] = False
    late["key"][3] = False  # an element with nothing patched of one type
    for node_masks in (masks, late, {"key": late["key"]}, {"neuron": masks["neuron"], "value": late["value"]}):
        cost = Cost()
        joint = engine.patch_masks(model, cache, node_masks, pair_i, cost)

        def patch(layer, site, x, run):
            for t, m in node_masks.items():
                if NODE_TABLE[t].site == site:
                    chosen = m[:, layer] if t == "neuron" else m[:, layer, :, :, None]
                    return torch.where(chosen, cache.source[t][layer][pair_i], x)
            return x

        with torch.inference_mode():
            logits = model.logits(pairs.clean[pair_i], Run(model.n_layers, patch=patch))[:, -1]
        brute = pairs.evaluate_metric(logits, pair_i) - cache.base_metric[pair_i]
        torch.testing.assert_close(joint, brute, rtol=0, atol=1e-13)
        first_layer = min(int(torch.nonzero(m.any(0).flatten(1).any(1))[0]) for m in node_masks.values())
        assert cost.forward == pytest.approx(len(pair_i) * (2 - first_layer) / 2)


def test_patch_masks_nothing_patched_costs_nothing():
    model, pairs = gpt2_toy()
    cache = engine.prepare(model, pairs, "noising", ["head"], Cost())
    cost = Cost()
    mask = torch.zeros(2, *node_shape("head", model.sizes, pairs.seq_len), dtype=torch.bool)
    assert engine.patch_masks(model, cache, {"head": mask}, torch.tensor([0, 1]), cost).abs().max() == 0
    assert cost.forward == 0


# Subsampling ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nodes", [["neuron", "head"], ["value"]])
def test_balanced_design_recovers_additive_effects_exactly(nodes):
    model, pairs = additive_toy()
    truth = atpstar.attribute(model, pairs, "activation_patching", nodes=nodes)
    estimate = atpstar.attribute(model, pairs, "subsampling", nodes=nodes, samples=64, design="balanced")
    for t in nodes:
        assert truth.per_pair[t].abs().max() > 1e-3
        torch.testing.assert_close(estimate.per_pair[t], truth.per_pair[t], rtol=0, atol=1e-12)
        assert (estimate.extras[f"count_in/{t}"] == 32).all() and (estimate.extras[f"count_out/{t}"] == 32).all()


def test_random_design_statistics_match_brute_force_and_costs_add_up():
    """Welford statistics over batches equal a direct computation from the recorded subsets and Δs."""
    model, pairs = additive_toy(n_layers=2, n_pairs=2, seq_len=3)
    nodes, samples, p, seed = ["neuron", "key"], 24, 0.3, 5
    result = atpstar.attribute(model, pairs, "subsampling", nodes=nodes, samples=samples, p=p, seed=seed, batch_size=7)
    # 2P base/source forwards + samples x P patched forwards; with p = 0.3 over 56 nodes every
    # 7-element batch patches something at layer 0, so each counts in full.
    assert result.cost.forward == pytest.approx(2 * 2 + samples * 2)
    assert result.cost.backward == 0
    from atpstar.sweeps.subsampling import random_subset

    cache = engine.prepare(model, pairs, "noising", nodes, Cost())
    shapes = {t: node_shape(t, model.sizes, pairs.seq_len) for t in nodes}
    sizes = [int(torch.Size(shapes[t]).numel()) for t in nodes]
    for j in range(pairs.n_pairs):
        subsets = torch.stack([random_subset(sum(sizes), p, seed, j, s) for s in range(samples)])  # [S, N]
        masks = {t: part.reshape(samples, *shapes[t]) for t, part in zip(nodes, subsets.split(sizes, 1))}
        delta = engine.patch_masks(model, cache, masks, torch.full((samples,), j), Cost())
        for n in range(sum(sizes)):
            t = nodes[0] if n < sizes[0] else nodes[1]
            flat = n if n < sizes[0] else n - sizes[0]
            inside, outside = delta[subsets[:, n]], delta[~subsets[:, n]]
            stat = lambda name: result.extras[f"{name}/{t}"][j].flatten()[flat]  # noqa: E731
            assert int(stat("count_in")) == len(inside) and int(stat("count_out")) == len(outside)
            if len(inside) >= 2:
                torch.testing.assert_close(stat("mean_in"), inside.mean(), rtol=0, atol=1e-13)
                torch.testing.assert_close(stat("var_in"), inside.var(), rtol=1e-9, atol=1e-15)
            if len(outside) >= 2:
                torch.testing.assert_close(stat("var_out"), outside.var(), rtol=1e-9, atol=1e-15)
            if len(inside) and len(outside):
                torch.testing.assert_close(result.per_pair[t][j].flatten()[flat], inside.mean() - outside.mean(),
                                           rtol=0, atol=1e-13)


def test_seeded_deterministic_and_batch_independent():
    model, pairs = additive_toy(n_layers=2)
    run = lambda **kw: atpstar.attribute(model, pairs, "subsampling", nodes=["head", "query"], samples=32, **kw)  # noqa: E731
    first, again, other_batch, other_seed = run(seed=1), run(seed=1), run(seed=1, batch_size=5), run(seed=2)
    for t in ("head", "query"):
        assert torch.equal(first.per_pair[t], again.per_pair[t])
        torch.testing.assert_close(first.per_pair[t], other_batch.per_pair[t], rtol=0, atol=1e-14)
        assert not torch.equal(first.per_pair[t], other_seed.per_pair[t])
    assert first.method == "subsampling" and first.options["samples"] == 32
    assert first.extras["var_in/query"].shape == (pairs.n_pairs, *node_shape("query", model.sizes, pairs.seq_len))


def test_random_design_approaches_truth_on_additive_model():
    model, pairs = additive_toy()
    truth = atpstar.attribute(model, pairs, "activation_patching", nodes=["neuron"])
    estimate = atpstar.attribute(model, pairs, "subsampling", nodes=["neuron"], samples=256)
    x = {k.split("/")[0]: v for k, v in estimate.extras.items()}
    standard_error = (x["var_in"] / x["count_in"] + x["var_out"] / x["count_out"]).sqrt()
    error = (estimate.per_pair["neuron"] - truth.per_pair["neuron"]).abs()
    assert (error <= 5 * standard_error).all()  # 5 sigma over 64 nodes: fails with probability < 1e-4


@pytest.mark.parametrize(
    "options, message",
    [
        ({"samples": 1}, "samples"),
        ({"p": 1.0}, "p must"),
        ({"design": "hadamard"}, "unknown design"),
        ({"design": "balanced", "samples": 48}, "power of two"),
        ({"design": "balanced", "samples": 64, "p": 0.25}, "p must be 0.5"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_options_fail_before_any_forward(options, message):
    model, pairs = additive_toy()
    with pytest.raises(atpstar.InputError, match=message):
        atpstar.attribute(model, pairs, "subsampling", nodes=["neuron"], **options)
