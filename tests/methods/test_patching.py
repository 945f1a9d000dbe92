"""Exact activation patching against a naive reference built from plain module hooks (float64)."""

from __future__ import annotations

import pytest
import torch

import atpstar
from reference import hooks
from reference.models import assert_rel_close, build_hf, load, make_pairs

ALL = ["neuron", "query", "key", "value", "head"]
REL = 1e-6


@pytest.mark.parametrize("direction", ["noising", "denoising"])
def test_matches_hook_reference(hf_model, family, direction):
    pairs = make_pairs()
    expected = hooks.exact_patching(hooks.reference_copy(hf_model), pairs, direction)
    result = atpstar.attribute(load(hf_model), pairs, method="activation_patching", nodes=ALL, direction=direction)
    assert result.direction == direction
    for t in ALL:
        assert_rel_close(result.per_pair[t], expected[t], REL, f"{family} {direction} {t}")
        assert float(expected[t].abs().max()) > 1e-3, f"{t}: reference effects are all ~0; the test would be vacuous"
        assert_rel_close(result.scores[t], expected[t].mean(0), REL, f"{t} scores = signed mean")


@pytest.mark.parametrize("batch_size", [1, 5])
def test_small_batches_mixing_positions(batch_size):
    """Batches whose nodes sit at different positions start at the smallest one; results must not change."""
    hf = build_hf("llama")
    pairs = make_pairs(n_pairs=2, seq_len=5)
    expected = hooks.exact_patching(hooks.reference_copy(hf), pairs, "noising", node_types=("key", "neuron"))
    result = atpstar.attribute(load(hf), pairs, method="activation_patching", nodes=["key", "neuron"],
                               batch_size=batch_size)
    for t in ("key", "neuron"):
        assert_rel_close(result.per_pair[t], expected[t], REL, t)


def test_logprob_metric():
    hf = build_hf("llama", seed=3)
    pairs = make_pairs(metric="logprob", seed=5)
    expected = hooks.exact_patching(hooks.reference_copy(hf), pairs, "noising", node_types=("query", "neuron"))
    result = atpstar.attribute(load(hf), pairs, method="activation_patching", nodes=["query", "neuron"])
    assert result.metric == "logprob"
    for t in ("query", "neuron"):
        assert_rel_close(result.per_pair[t], expected[t], REL, t)


def test_callable_metric():
    def squared_margin(logits, answer, distractor):
        rows = torch.arange(len(answer))
        return (logits[rows, answer] - logits[rows, distractor]) ** 2 + logits.logsumexp(-1)

    hf = build_hf("gpt_neox", seed=4)
    pairs = make_pairs(metric=squared_margin)
    expected = hooks.exact_patching(hooks.reference_copy(hf), pairs, "denoising", node_types=("value", "head"))
    result = atpstar.attribute(load(hf), pairs, method="activation_patching", nodes=["value", "head"],
                               direction="denoising")
    assert result.metric == "squared_margin"
    for t in ("value", "head"):
        assert_rel_close(result.per_pair[t], expected[t], REL, t)


def test_unchanged_positions_have_zero_effect(hf_model):
    """Nodes at positions before the first token difference (position 1) have no effect (float64 round-off)."""
    pairs = make_pairs()  # first difference at position 1
    result = atpstar.attribute(load(hf_model), pairs, method="activation_patching", nodes=ALL)
    for t, value in result.per_pair.items():
        first_pos = value[:, :, 0] if t == "neuron" else value[..., 0]
        assert float(first_pos.abs().max()) <= 1e-12 * float(value.abs().max()), t


def test_base_metric_recorded(hf_model):
    pairs = make_pairs()
    result = atpstar.attribute(load(hf_model), pairs, method="activation_patching", nodes=["head"])
    ref = hooks.reference_copy(hf_model)
    with torch.no_grad():
        logits = ref(pairs.clean).logits[:, -1]
    expected = hooks.metric_of(logits, pairs.answer, pairs.distractor, "logit_diff")
    assert_rel_close(torch.tensor(result.info["base_metric"], dtype=torch.float64), expected, 1e-10, "base metric")


def test_layers_option_patches_only_those_layers():
    hf = build_hf("gpt_neox")
    pairs = make_pairs(n_pairs=2, seq_len=5)
    full = atpstar.attribute(load(hf), pairs, method="activation_patching", nodes=["head", "neuron"])
    part = atpstar.attribute(load(hf), pairs, method="activation_patching", nodes=["head", "neuron"], layers=[1])
    assert part.info["layers"] == [1]
    for t in ("head", "neuron"):
        assert_rel_close(part.per_pair[t][:, 1], full.per_pair[t][:, 1], REL, t)
        assert float(part.per_pair[t][:, 0].abs().max()) == 0.0
    assert part.cost.forward < full.cost.forward
    with pytest.raises(atpstar.InputError, match="layers"):
        atpstar.attribute(load(hf), pairs, method="activation_patching", nodes=["head"], layers=[7])


def test_interrupted_sweep_resumes_from_checkpoint(tmp_path, monkeypatch):
    """An interrupt keeps finished units (pair block x layer) in the checkpoint folder; a rerun patches only the rest."""
    import atpstar.engine as engine_module

    hf = build_hf("llama")
    pairs = make_pairs(n_pairs=2, seq_len=5)
    full = atpstar.attribute(load(hf), pairs, method="activation_patching", nodes=["key", "head"], batch_size=4)
    checkpoint = str(tmp_path / "sweep")
    real_patch = engine_module.patch_node_batch
    calls = {"n": 0}

    def interrupt_after_first_unit(*args, **kwargs):
        calls["n"] += 1
        if list((tmp_path / "sweep").glob("patch_*.safetensors")):
            raise KeyboardInterrupt  # the first unit is saved as it finishes: a SIGKILL here would keep it
        return real_patch(*args, **kwargs)

    monkeypatch.setattr(engine_module, "patch_node_batch", interrupt_after_first_unit)
    with pytest.raises(KeyboardInterrupt):
        atpstar.attribute(load(hf), pairs, method="activation_patching", nodes=["key", "head"], batch_size=4,
                          checkpoint=checkpoint)
    monkeypatch.setattr(engine_module, "patch_node_batch", real_patch)
    resumed = atpstar.attribute(load(hf), pairs, method="activation_patching", nodes=["key", "head"], batch_size=4,
                                checkpoint=checkpoint)
    for t in ("key", "head"):
        assert_rel_close(resumed.per_pair[t], full.per_pair[t], REL, t)
    assert resumed.cost == full.cost  # the whole computation's cost, not only the resumed part's
    assert resumed.info["resumed_from"] == checkpoint and resumed.info["units_resumed"] == 1
    calls["n"] = 0
    monkeypatch.setattr(engine_module, "patch_node_batch", interrupt_after_first_unit)
    again = atpstar.attribute(load(hf), pairs, method="activation_patching", nodes=["key", "head"], batch_size=4,
                              checkpoint=checkpoint)  # everything done: no patched forward at all
    assert calls["n"] == 0 and again.cost == full.cost
    monkeypatch.setattr(engine_module, "patch_node_batch", real_patch)

    other = make_pairs(n_pairs=2, seq_len=5, seed=7)
    with pytest.raises(atpstar.InputError, match=r"checkpoint .* prompt pairs \(tokens\) \(saved"):
        atpstar.attribute(load(hf), other, method="activation_patching", nodes=["key", "head"], checkpoint=checkpoint)
    for unit_file in (tmp_path / "sweep").glob("patch_*.safetensors"):
        data = unit_file.read_bytes()
        unit_file.write_bytes(data[: len(data) // 2])  # truncated: reported, recomputed
    with pytest.warns(UserWarning, match="unreadable"):
        fresh = atpstar.attribute(load(hf), pairs, method="activation_patching", nodes=["key", "head"], batch_size=4,
                                  checkpoint=checkpoint)
    assert fresh.cost == full.cost and "resumed_from" not in fresh.info


def test_single_file_checkpoint_of_an_older_version_is_refused(tmp_path):
    model, pairs = load(build_hf("gpt2")), make_pairs(n_pairs=2, seq_len=5)
    old = tmp_path / "sweep.safetensors"
    old.write_bytes(b"an atpstar 0.2 checkpoint")
    with pytest.raises(atpstar.InputError, match="is a file.*cannot be resumed.*run again"):
        atpstar.attribute(model, pairs, method="activation_patching", nodes=["head"], checkpoint=str(old))


def test_pairs_stream_through_in_blocks_when_memory_is_short():
    """A budget too small for every pair's cache streams over pair blocks, with the same effects and cost."""
    from atpstar.errors import InputError
    from atpstar.methods.base import METHODS

    model = load(build_hf("llama", n_layers=2, seed=41))
    pairs = make_pairs(n_pairs=5, seq_len=6)
    nodes = ["neuron", "query", "key", "value", "head"]
    full = atpstar.attribute(model, pairs, method="activation_patching", nodes=nodes)
    assert "pair_block" not in full.info
    budget = 1.0  # the smallest power-of-two budget the plan accepts
    while True:
        try:
            METHODS["activation_patching"](memory_gb=budget / 2).memory_plan(model, 5, 6, nodes)
        except InputError:
            break
        budget /= 2
    plan = METHODS["activation_patching"](memory_gb=budget).memory_plan(model, 5, 6, nodes)
    assert plan.pair_block is not None and plan.pair_block < 5
    blocked = atpstar.attribute(model, pairs, method="activation_patching", nodes=nodes, memory_gb=budget)
    assert blocked.info["pair_block"] == plan.pair_block
    assert blocked.info["memory"]["working_gb"] <= budget
    assert blocked.info["base_metric"] == pytest.approx(full.info["base_metric"], rel=1e-12)
    for t in nodes:
        torch.testing.assert_close(blocked.per_pair[t], full.per_pair[t], rtol=1e-12, atol=1e-13)
    assert blocked.cost.forward == pytest.approx(full.cost.forward, rel=1e-12)
