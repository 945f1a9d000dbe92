"""Reading the three formats, the site mapping, and the refusals (wrong width, unknown hook, bad names)."""

from __future__ import annotations

import json

import pytest
import torch

import atpstar
from atpstar.dictionaries.sites import run_site
from atpstar.errors import InputError
from atpstar.testing import tiny_model
from atpstar.testing.fixtures import (
    random_dictionary_weights,
    write_circuit_tracer,
    write_gemma_scope,
    write_saelens,
)


@pytest.mark.parametrize(
    ("hook", "site"),
    [
        ("blocks.3.hook_resid_pre", ("resid_pre", 3)),
        ("blocks.3.hook_resid_post", ("resid_pre", 4)),
        ("blocks.3.hook_resid_mid", ("resid_mid", 3)),
        ("blocks.3.hook_attn_out", ("attn_out", 3)),
        ("blocks.3.hook_mlp_in", ("mlp_in", 3)),
        ("blocks.3.hook_mlp_out", ("mlp_out", 3)),
        ("blocks.3.mlp.hook_out", ("mlp_out", 3)),
    ],
)
def test_hooks_map_onto_run_sites(hook, site):
    assert (run_site(hook).site, run_site(hook).layer) == site


def test_saelens_config_keys(tmp_path):
    folder = write_saelens(tmp_path / "s", "blocks.1.hook_resid_pre", 32, 8, seed=3, activation="jumprelu",
                           apply_b_dec_to_input=False, neuronpedia_id="toy/1-res")  # fmt: skip
    d = atpstar.load_dictionary(folder)
    assert (d.name, d.hook, d.layer, d.activation, d.d_in, d.d_sae) == ("s", "blocks.1.hook_resid_pre", 1, "jumprelu", 32, 8)
    assert not d.apply_b_dec_to_input and d.id == "toy/1-res"
    torch.testing.assert_close(d.threshold, random_dictionary_weights(32, 8, 3, threshold=True)["threshold"])
    # SAELens < 6: hook_name at the top level, activation_fn_str "topk" with activation_fn_kwargs
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.pop("metadata")
    cfg.update(hook_name="blocks.0.hook_attn_out", architecture="standard", activation_fn_str="topk",
               activation_fn_kwargs={"k": 2})  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(cfg))
    old = atpstar.load_dictionary(folder / "sae_weights.safetensors", name="old")
    assert (old.hook, old.activation, old.k) == ("blocks.0.hook_attn_out", "topk", 2)
    assert int((old.encode(torch.randn(5, 32, dtype=torch.float64)) > 0).sum(-1).max()) <= 2


def test_saelens_refuses_what_it_cannot_compute(tmp_path):
    folder = write_saelens(tmp_path / "g", "blocks.0.hook_resid_pre", 32, 8, architecture="gated")
    with pytest.raises(InputError, match="gated"):
        atpstar.load_dictionary(folder)
    folder = write_saelens(tmp_path / "n", "blocks.0.hook_resid_pre", 32, 8, normalize_activations="expected_average_only_in")
    with pytest.raises(InputError, match="expected_average_only_in"):
        atpstar.load_dictionary(folder)


def test_gemma_scope_site_and_layer_from_folders_or_caller(tmp_path):
    folder = write_gemma_scope(tmp_path, "resid_post", 4, 32, 8)
    d = atpstar.load_dictionary(folder)
    assert (d.hook, d.layer, d.activation, d.output_hook) == ("blocks.4.hook_resid_post", 4, "jumprelu", None)
    transcoder = atpstar.load_dictionary(write_gemma_scope(tmp_path, "transcoder", 2, 32, 8))
    assert (transcoder.hook, transcoder.write_hook) == ("blocks.2.hook_mlp_in", "blocks.2.hook_mlp_out")
    bare = tmp_path / "elsewhere"
    (folder / "params.safetensors").rename(bare.mkdir() or bare / "params.safetensors")
    with pytest.raises(InputError, match="site= and layer="):
        atpstar.load_dictionary(bare)
    assert atpstar.load_dictionary(bare, site="attn_out", layer=1).hook == "blocks.1.hook_attn_out"


def test_circuit_tracer_transcoders(tmp_path):
    folder = write_circuit_tracer(tmp_path / "ct", [0, 1, 2], 32, 8, seed=7, jumprelu=True)
    with pytest.raises(InputError, match="layers \\[0, 1, 2\\]"):
        atpstar.load_dictionary(folder)
    d = atpstar.load_dictionary(folder / "layer_2.safetensors")
    want = random_dictionary_weights(32, 8, 7 + 2, threshold=True, skip=True)
    assert (d.name, d.hook, d.write_hook, d.transcoder) == ("tc-layer2", "blocks.2.hook_mlp_in", "blocks.2.hook_mlp_out", True)
    for key in ("W_enc", "W_dec", "W_skip", "threshold"):
        torch.testing.assert_close(d.tensors()[key], want[key])
    normalised = write_circuit_tracer(tmp_path / "ln", [0], 32, 8, input_hook="ln2.hook_normalized")
    with pytest.raises(InputError, match="unknown dictionary hook"):
        atpstar.load_dictionary(normalised)


def test_unknown_folder_and_unreachable_hub(tmp_path):
    with pytest.raises(InputError, match="no dictionary found"):
        atpstar.load_dictionary(tmp_path)
    with pytest.raises(InputError, match="could not download|neither"):
        atpstar.load_dictionary("no-such-owner-xyz/no-such-repo/layer_1")


def test_another_models_dictionary_is_refused_naming_both_sizes(tmp_path):
    model, pairs = tiny_model(), atpstar.testing.tiny_pairs()
    wide = atpstar.load_dictionary(write_saelens(tmp_path / "w", "blocks.0.hook_resid_post", 48, 8), name="wide")
    with pytest.raises(InputError, match=r"d_in 48.*blocks\.0\.hook_resid_post.*d_model=32"):
        atpstar.attribute(model, pairs, "atp", nodes=["head"], dictionaries=[wide])
    deep = atpstar.load_dictionary(write_saelens(tmp_path / "d", "blocks.7.hook_attn_out", 32, 8), name="deep")
    with pytest.raises(InputError, match="blocks.7.hook_attn_out.*layers 0..1"):
        atpstar.attribute(model, pairs, "atp", nodes=["head"], dictionaries=[deep])
    last = atpstar.load_dictionary(write_saelens(tmp_path / "l", "blocks.1.hook_resid_post", 32, 8), name="last")
    with pytest.raises(InputError, match="final residual stream"):
        atpstar.attribute(model, pairs, "atp", nodes=["head"], dictionaries=[last])
    with pytest.raises(InputError, match="unknown dictionary hook"):
        atpstar.load_dictionary(write_saelens(tmp_path / "z", "blocks.0.attn.hook_z", 32, 8))


def test_names_that_would_clash_are_refused(tmp_path):
    folder = write_saelens(tmp_path / "s", "blocks.0.hook_resid_pre", 32, 8)
    with pytest.raises(InputError, match="bad dictionary name"):
        atpstar.load_dictionary(folder, name="sae[1]")
    head = atpstar.load_dictionary(folder, name="head")
    with pytest.raises(InputError, match="built-in node types"):
        atpstar.attribute(tiny_model(), atpstar.testing.tiny_pairs(), "atp", nodes=["head"], dictionaries=[head])
