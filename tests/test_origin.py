"""``Model.origin``: what ``load_model`` loaded, and how Ray workers use it to load the same model."""

from __future__ import annotations

import pytest
import torch
from reference.models import build_hf, load

import atpstar
from atpstar.origin import Origin, weights_signature


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "tiny-llama"
    build_hf("llama", dtype=torch.float32, exact_norm=False).save_pretrained(path)
    return path


def test_folder_model_records_its_absolute_folder(folder, monkeypatch):
    monkeypatch.chdir(folder.parent)
    model = atpstar.load_model("tiny-llama", dtype="float64")  # relative: workers may start elsewhere
    assert model.origin == Origin(kind="folder", name=str(folder), dtype="float64", device=None)
    assert model.origin.weights == weights_signature(model.hf_model)


def test_builtin_name_and_model_object():
    assert atpstar.load_model("toy-ioi", device="cpu").origin == Origin("builtin", "toy-ioi", "float32", "cpu")
    assert load(build_hf("gpt2")).origin is None  # handed over as an object: nothing to load it from


def test_workers_load_the_folder_until_the_weights_change(folder):
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'atpstar[distributed]'")
    from atpstar.distributed.source import source_for

    model = atpstar.load_model(str(folder))
    source = source_for(model)  # by name: no Ray connection needed, nothing shipped
    assert (source.name, source.dtype, source.key) == (str(folder), "float32", f"name:{folder}:float32")
    with torch.no_grad():
        next(model.hf_model.parameters()).mul_(2.0)
    assert weights_signature(model.hf_model) != model.origin.weights  # source_for now ships the weights
