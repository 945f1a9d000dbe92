"""gradients: the shared gradient step, against hook-based references and GradDrop's separate backwards."""

from __future__ import annotations

import torch
from reference import brute, hooks
from reference.models import assert_rel_close, build_hf, load, make_pairs

from atpstar.cost import Cost
from atpstar.gradients import atp_estimate, gradient_step
from atpstar.nodes import NODE_TABLE

ALL = ["neuron", "query", "key", "value", "head"]


def test_plain_step_gives_atp_and_counts_its_passes():
    model = load(build_hf("llama", seed=4))
    pairs = make_pairs(n_pairs=3)
    expected = hooks.atp(hooks.reference_copy(model.hf_model), pairs, "denoising")
    sites = [NODE_TABLE[t].site for t in ALL]
    cost = Cost()
    step = gradient_step(model, pairs, torch.arange(3), direction="denoising", sites=sites, grad_sites=sites, cost=cost)
    assert step.metric.shape == (3,)
    for t in ALL:
        estimate = torch.stack([atp_estimate(step, t, layer, step.grads) for layer in range(model.n_layers)], 1)
        assert_rel_close(estimate, expected[t], 1e-6, t)
    assert (cost.forward, cost.backward) == (6.0, 3.0)


def test_dropped_gradients_equal_separate_dropped_backwards():
    model = load(build_hf("gpt2", n_layers=3, seed=5))
    pairs = make_pairs()
    sites = [NODE_TABLE[t].site for t in ALL]
    cost = Cost()
    step = gradient_step(
        model, pairs, torch.arange(2), direction="noising", sites=sites, grad_sites=sites, cost=cost, grad_drop=True
    )
    seen = []
    for drop, grads in step.dropped():
        seen.append(drop)
        expected = brute.atp(model, pairs, ALL, drop_layer=drop)
        for t in ALL:
            for layer in range(drop):
                got = atp_estimate(step, t, layer, grads)
                assert_rel_close(got, expected[t][:, layer], 1e-6, f"drop {drop} {t} layer {layer}")
    assert seen == [1, 2]
    assert cost.backward == 2 * (1 + 1 / 3 + 2 / 3)
