"""Latent and error nodes of random dictionaries in all three formats, against brute force in float64, on
small random models of three families."""

from __future__ import annotations

import latent_refs as ref
import pytest
import torch

import atpstar
from atpstar.dictionaries import detach
from atpstar.testing import assert_unchanged, snapshot
from atpstar.testing.fixtures import (
    random_dictionary_weights,
    write_circuit_tracer,
    write_gemma_scope,
    write_saelens,
)
from reference.models import build_hf, load, make_pairs

FAMILIES = ["gpt2", "gpt_neox", "llama"]
D, S = 32, 6


def dictionaries(root) -> list[tuple[atpstar.Dictionary, ref.Spec]]:
    """Four dictionaries, written in the three formats and read back, with their reference specs."""
    out = []
    folder = write_saelens(root / "sl-topk", "blocks.0.hook_resid_post", D, S, seed=1, activation="topk", k=3,
                           normalize_activations="constant_norm_rescale")  # fmt: skip
    spec = ref.Spec("sae-topk", "blocks.0.hook_resid_post", "blocks.0.hook_resid_post",
                    random_dictionary_weights(D, S, 1), "topk", 3, True, "constant_norm_rescale")  # fmt: skip
    out.append((atpstar.load_dictionary(folder, name="sae-topk"), spec))
    folder = write_saelens(root / "sl-relu", "blocks.1.hook_resid_post", D, S, seed=2, apply_b_dec_to_input=False)
    spec = ref.Spec("sae-relu", "blocks.1.hook_resid_post", "blocks.1.hook_resid_post", random_dictionary_weights(D, S, 2))
    out.append((atpstar.load_dictionary(folder, name="sae-relu"), spec))
    folder = write_gemma_scope(root / "gs", "attn_out", 1, D, S, seed=3)
    weights = random_dictionary_weights(D, S, 3, threshold=True)
    out.append((atpstar.load_dictionary(folder), ref.Spec("gs", "blocks.1.hook_attn_out", "blocks.1.hook_attn_out",
                                                            weights, "jumprelu")))  # fmt: skip
    folder = write_circuit_tracer(root / "ct", [0, 1], D, S, seed=4)
    weights = random_dictionary_weights(D, S, 4 + 1, skip=True)
    spec = ref.Spec("tc", "blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out", weights)
    out.append((atpstar.load_dictionary(folder, layer=1), spec))
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def setting(request, tmp_path_factory):
    model = load(build_hf(request.param, n_layers=3, seed=0))
    pairs = make_pairs(n_pairs=2, seq_len=5)
    found = dictionaries(tmp_path_factory.mktemp(request.param))
    yield model, pairs, found
    detach(d.name for d, _ in found)


def run(model, pairs, method, found, **options):
    return atpstar.attribute(model, pairs, method, nodes=["head"], dictionaries=[d for d, _ in found], **options)


def compare(result, found, reference, rtol=1e-9):
    for d, spec in found:
        latents, error = reference(spec)
        torch.testing.assert_close(result.per_pair[d.name].double(), latents, rtol=rtol, atol=1e-11)
        torch.testing.assert_close(result.per_pair[d.name + ".error"].double(), error, rtol=rtol, atol=1e-11)


def test_loaders_read_the_weights_written(setting):
    _, _, found = setting
    for d, spec in found:
        assert (d.hook, d.write_hook, d.activation) == (spec.read, spec.write, spec.activation)
        for key, value in spec.weights.items():
            torch.testing.assert_close(d.tensors()[key].double(), value)


def test_exact_latent_and_error_effects_are_the_reference_patch(setting):
    model, pairs, found = setting
    result = run(model, pairs, "activation_patching", found)
    compare(result, found, lambda spec: ref.exact(model, pairs, spec))


def test_atp_is_the_linearisation_of_the_spliced_dictionary(setting):
    model, pairs, found = setting
    compare(run(model, pairs, "atp", found), found, lambda spec: ref.linearised(model, pairs, spec))


def test_atp_denoising(setting):
    model, pairs, found = setting
    result = atpstar.attribute(model, pairs, "atp", nodes=[found[2][0].name], direction="denoising",
                               dictionaries=[found[2][0]])  # fmt: skip
    latents, _ = ref.linearised(model, pairs, found[2][1], "denoising")
    torch.testing.assert_close(result.per_pair[found[2][0].name].double(), latents, rtol=1e-9, atol=1e-11)


def test_graddrop_is_the_mean_over_dropped_layers(setting):
    model, pairs, found = setting
    compare(run(model, pairs, "atp+graddrop", found), found, lambda spec: ref.graddrop(model, pairs, spec))


def test_integrated_gradients_average_the_spliced_gradient(setting):
    model, pairs, found = setting
    plain = found[1:]  # IG's pullback uses the base run's decoder scale: normalised SAEs differ along the path
    result = run(model, pairs, "atp+ig", plain, ig_steps=3)
    compare(result, plain, lambda spec: ref.linearised(model, pairs, spec, steps=3))


def test_attaching_dictionaries_never_changes_the_model_output(setting):
    model, pairs, found = setting
    before, logits = snapshot(model.hf_model), model.logits(pairs.clean)
    run(model, pairs, "atp", found)
    assert_unchanged(model.hf_model, before)
    assert torch.equal(model.logits(pairs.clean), logits)
    # the spliced model (every dictionary's write(f) + error in place of its site) computes the same logits
    for d, _ in found:
        read, write = ref.site_of(d.hook), ref.site_of(d.write_hook)
        seen = {}

        def splice(layer, site, x, run, d=d, read=read, write=write):
            if (site, layer) == read:
                seen["x"] = x
            if (site, layer) == write:
                return d.write(d.encode(seen["x"]), seen["x"]) + d.error(seen["x"], x)
            return x

        spliced = model.logits(pairs.clean, atpstar.runner.Run(model.n_layers, patch=splice))
        torch.testing.assert_close(spliced, logits, rtol=0, atol=1e-10)


def test_latents_mix_with_site_nodes_in_one_call(setting):
    model, pairs, found = setting
    mixed = run(model, pairs, "atp", found)
    alone = atpstar.attribute(model, pairs, "atp", nodes=["head"])
    assert torch.equal(mixed.per_pair["head"], alone.per_pair["head"])
    assert list(mixed.per_pair)[0] == "head" and len(mixed.per_pair) == 1 + 2 * len(found)


def test_qk_fix_recomputes_the_downstream_attention(setting):
    model, pairs, found = setting
    result = run(model, pairs, "atp+qkfix", found)
    plain = run(model, pairs, "atp", found)
    # every write here is read by a later attention: resid_post 0 and 1 (layers 1, 2), attn_out and mlp_out of 1 (2)
    assert all(ref.downstream(spec, model.n_layers) is not None for _, spec in found)
    compare(result, found, lambda spec: ref.qk_fixed(model, pairs, spec), rtol=1e-8)
    for d, _ in found:
        assert not torch.allclose(result.per_pair[d.name], plain.per_pair[d.name])


def test_atpstar_combines_the_qk_fix_and_graddrop(setting):
    model, pairs, found = setting
    result = run(model, pairs, "atp*", found)
    compare(result, found, lambda spec: ref.atpstar_reference(model, pairs, spec), rtol=1e-8)
