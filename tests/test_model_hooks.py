"""The residual-stream and block-output run sites: resid_pre, attn_proj, attn_out, resid_mid, mlp_in, mlp_out.

Float64 tiny models of every layout: GPT-2, GPT-NeoX (parallel, and sequential by config), Llama, and
the post-norm families Gemma-2 and OLMo-2. Recording a site must equal what the residual stream
shows (differences of consecutive streams), patching it by the identity must leave the logits
bit-equal, and patching it by a shift must act where the documentation says.
"""

from __future__ import annotations

import pytest
import torch
from reference.models import assert_rel_close, build_hf, load, make_pairs, snapshot

from atpstar.runner import SITES, Run
from atpstar.testing import assert_unchanged

STREAM = ("resid_pre", "attn_proj", "attn_out", "resid_mid", "mlp_in", "mlp_out")
LAYOUTS = {
    "gpt2": {},
    "gpt_neox": {},
    "gpt_neox_sequential": {"use_parallel_residual": False},
    "llama": {},
    "gemma2": {},
    "olmo2": {},
}
REL = 1e-12


@pytest.fixture(params=list(LAYOUTS), scope="module")
def model(request):
    family = request.param.removesuffix("_sequential")
    return load(build_hf(family, **LAYOUTS[request.param]))


def record(model, tokens, patch=None):
    run = Run(model.n_layers, record=SITES, patch=patch)
    with torch.no_grad():
        logits = model.unembed(model.run_layers(model.embed(tokens), run))
    return run, logits


def shift_at(layer, site, delta):
    def patch(at_layer, at_site, x, run):
        return x + delta if (at_layer, at_site) == (layer, site) else x

    return patch


def test_sites_come_in_the_documented_order_with_their_shapes(model):
    tokens = make_pairs(n_pairs=2, seq_len=5).clean
    seen = []

    def watch(layer, site, x, run):
        seen.append((layer, site, tuple(x.shape)))
        return x

    record(model, tokens, watch)
    d, m = model.d_model, model.d_mlp
    expected_sites = [s for s in SITES if s != "resid_mid" or not model.parallel_residual]
    for layer in range(model.n_layers):
        assert [s for at, s, _ in seen if at == layer] == expected_sites
    shapes = {(at, s): shape for at, s, shape in seen}
    for site in STREAM:
        if site in expected_sites:
            assert shapes[(0, site)] == (2, 5, d), site
    assert shapes[(0, "neuron")] == (2, 5, m)
    assert seen[-1] == (model.n_layers, "resid_pre", (2, 5, d))  # the final residual stream


def test_recorded_sites_are_the_differences_of_the_residual_stream(model):
    run, _ = record(model, make_pairs().clean)
    for layer in range(model.n_layers):
        before, after = run.get("resid_pre", layer), run.get("resid_pre", layer + 1)
        attn, mlp = run.get("attn_out", layer), run.get("mlp_out", layer)
        assert_rel_close(after - before, attn + mlp, REL, f"layer {layer}: stream change = attention + MLP")
        if model.parallel_residual:
            assert run.records["resid_mid"][layer] is None
            assert torch.equal(run.get("mlp_in", layer), before)  # both blocks read the layer input
        else:
            mid = run.get("resid_mid", layer)
            assert_rel_close(mid - before, attn, REL, f"layer {layer}: resid_mid - resid_pre = attn_out")
            assert_rel_close(after - mid, mlp, REL, f"layer {layer}: resid_post - resid_mid = mlp_out")
            assert torch.equal(run.get("mlp_in", layer), mid)
        if model.post_norm:  # the write is the normalised projection
            assert float((run.get("attn_proj", layer) - attn).abs().max()) > 1e-3
        else:
            assert torch.equal(run.get("attn_proj", layer), attn)


@pytest.mark.parametrize("site", STREAM)
def test_identity_patch_leaves_logits_bit_equal(model, site):
    tokens = make_pairs().clean
    _, plain = record(model, tokens)
    _, patched = record(model, tokens, lambda layer, at, x, run: x.clone() if at == site else x)
    assert torch.equal(patched, plain)


def test_patched_shift_acts_where_documented(model):
    """Shifting the stream by d at equivalent places gives the same logits; mlp_in reaches the MLP only."""
    tokens = make_pairs().clean
    base, plain = record(model, tokens)
    delta = 0.5 * torch.randn(base.get("attn_out", 0).shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, after_mlp = record(model, tokens, shift_at(0, "mlp_out", delta))
    _, next_layer = record(model, tokens, shift_at(1, "resid_pre", delta))
    assert float((after_mlp - plain).abs().max()) > 1e-3
    assert_rel_close(next_layer, after_mlp, REL, "mlp_out of layer 0 vs resid_pre of layer 1")
    if not model.parallel_residual:
        _, after_attn = record(model, tokens, shift_at(0, "attn_out", delta))
        _, mid = record(model, tokens, shift_at(0, "resid_mid", delta))
        assert_rel_close(mid, after_attn, REL, "resid_mid vs attn_out")
    run, _ = record(model, tokens, shift_at(0, "mlp_in", delta))
    reads = run.get("resid_mid", 0) if not model.parallel_residual else run.get("resid_pre", 0)
    assert torch.equal(reads, base.get("mlp_in", 0))  # the stream itself is unchanged
    assert_rel_close(run.get("mlp_in", 0), reads + delta, REL, "the MLP reads the shifted input")
    stream = run.get("resid_pre", 1) - run.get("attn_out", 0) - run.get("mlp_out", 0)
    assert_rel_close(stream, base.get("resid_pre", 0), REL, "resid_post = resid_pre + attn_out + new mlp_out")


def test_module_sites_leave_no_hooks(model):
    before = snapshot(model.hf_model)
    with pytest.raises(RuntimeError, match="boom"):
        record(model, make_pairs().clean, lambda layer, site, x, run: _boom() if site == "mlp_out" else x)
    record(model, make_pairs().clean, lambda layer, site, x, run: x)
    assert_unchanged(model.hf_model, before)


def test_a_forward_inside_a_patch_does_not_reach_the_outer_run(model):
    """Patches may run the model again (``layer_qkv`` does); the outer run's hooks must not see that pass."""
    tokens = make_pairs().clean
    seen = []

    def outer(layer, site, x, run):
        if (layer, site) == (1, "resid_pre"):
            model.run_layers(x, Run(model.n_layers, start_layer=1))
        seen.append((layer, site))
        return x

    record(model, tokens, outer)
    assert len(seen) == len(set(seen))


def _boom():
    raise RuntimeError("boom")
