"""engine: the cache of base/source activations and patched forwards started late."""

from __future__ import annotations

import torch

from atpstar.cost import Cost
from atpstar.engine import patch_masks, patch_node_batch, prepare
from reference import hooks
from reference.models import assert_rel_close, load, make_pairs


def test_prepare_caches_base_and_source(hf_model):
    model = load(hf_model)
    pairs = make_pairs()
    cost = Cost()
    cache = prepare(model, pairs, "noising", ["neuron", "key"], cost)
    assert cost.forward == 2 * pairs.n_pairs and cost.backward == 0
    assert len(cache.resid) == model.n_layers and cache.resid[0].shape == (2, pairs.seq_len, model.d_model)
    assert cache.keys[1].shape == (2, model.n_kv_heads, pairs.seq_len, model.d_head)
    assert cache.source["neuron"][0].shape == (2, pairs.seq_len, model.d_mlp)
    ref = hooks.reference_copy(hf_model)
    with torch.no_grad():
        logits = ref(pairs.clean).logits[:, -1]
    assert_rel_close(cache.base_metric, hooks.metric_of(logits, pairs.answer, pairs.distractor, "logit_diff"), 1e-12)


def test_single_nodes_at_mixed_positions(hf_model):
    """One batch patching nodes of different pairs at different positions equals the hook reference."""
    model = load(hf_model)
    pairs = make_pairs()
    expected = hooks.exact_patching(hooks.reference_copy(hf_model), pairs, node_types=("value",))["value"]
    cache = prepare(model, pairs, "noising", ["value"], Cost())
    pair_i = torch.tensor([0, 1, 1, 0])
    unit_i = torch.tensor([1, 0, 1, 0])
    pos_i = torch.tensor([4, 2, 5, 1])
    cost = Cost()
    effect = patch_node_batch(model, cache, 1, ["value"], torch.zeros_like(pair_i), pair_i, unit_i, pos_i, cost)
    assert_rel_close(effect, expected[pair_i, 1, unit_i, pos_i], 1e-9, "value")
    assert abs(cost.forward - 4 * (model.n_layers - 1) / model.n_layers) < 1e-12


def test_patch_masks_joint_equals_sum_for_one_node_and_matches_reference(hf_model):
    model = load(hf_model)
    pairs = make_pairs()
    cache = prepare(model, pairs, "noising", ["head", "neuron"], Cost())
    single = hooks.exact_patching(hooks.reference_copy(hf_model), pairs, node_types=("head",))["head"]
    mask = torch.zeros(2, model.n_layers, model.n_heads, pairs.seq_len, dtype=torch.bool)
    mask[0, 1, 2, 4] = True
    mask[1, 0, 3, 3] = True
    effect = patch_masks(model, cache, {"head": mask}, torch.tensor([0, 1]), Cost())
    assert_rel_close(effect, torch.stack([single[0, 1, 2, 4], single[1, 0, 3, 3]]), 1e-9, "single-node masks")
    # All nodes of all types at once on pair 0 = the source run's metric minus the base metric.
    everything = {
        "head": torch.ones(1, model.n_layers, model.n_heads, pairs.seq_len, dtype=torch.bool),
        "neuron": torch.ones(1, model.n_layers, pairs.seq_len, model.d_mlp, dtype=torch.bool),
    }
    effect = patch_masks(model, cache, everything, torch.tensor([0]), Cost())
    ref = hooks.reference_copy(hf_model)
    with torch.no_grad():
        noise_metric = hooks.metric_of(ref(pairs.noise).logits[:1, -1], pairs.answer[:1], pairs.distractor[:1], "logit_diff")
    assert_rel_close(effect, noise_metric - cache.base_metric[:1], 1e-9, "patch everything = run the source")
    empty = patch_masks(model, cache, {"head": torch.zeros_like(mask)}, torch.tensor([0, 1]), Cost())
    assert torch.equal(empty, torch.zeros(2, dtype=empty.dtype))
