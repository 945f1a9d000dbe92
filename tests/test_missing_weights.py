"""A model folder whose checkpoint lacks a weight is refused by name; tied weights are not missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

import atpstar
from atpstar.cli import main
from atpstar.errors import InputError
from atpstar.loading import check_complete
from test_cli import make_tiny, write_pairs


def _drop(folder: Path, key: str) -> Path:
    weights = load_file(str(folder / "model.safetensors"))
    del weights[key]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    complete = make_tiny(root / "complete")
    lacking = _drop(make_tiny(root / "lacking"), "gpt_neox.layers.1.mlp.dense_4h_to_h.weight")
    torch.manual_seed(0)
    tied = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    tied.save_pretrained(root / "tied")  # lm_head is tied to the embeddings: not in the checkpoint
    return {"complete": complete, "lacking": lacking, "tied": root / "tied", "pairs": write_pairs(root / "p.jsonl")}


def test_a_missing_weight_is_refused_by_name(folders) -> None:
    with pytest.raises(InputError, match=r"missing 1 weight\(s\).*gpt_neox\.layers\.1\.mlp\.dense_4h_to_h\.weight"):
        atpstar.load_model(str(folders["lacking"]))


def test_complete_and_tied_checkpoints_load(folders) -> None:
    model = atpstar.load_model(str(folders["complete"]))
    assert model.model_id == str(folders["complete"])
    tied = atpstar.load_model(str(folders["tied"]))
    assert tied.hf_model.lm_head.weight is tied.hf_model.transformer.wte.weight


def test_a_tied_weight_reported_missing_is_not_refused() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    check_complete(model, {"lm_head.weight"}, "tied")  # shares its tensor with transformer.wte.weight
    with pytest.raises(InputError, match="transformer.h.0.attn.c_attn.bias"):
        check_complete(model, {"lm_head.weight", "transformer.h.0.attn.c_attn.bias"}, "tied")


def test_the_cli_refuses_a_missing_weight_cleanly(folders, tmp_path, capsys) -> None:
    code = main(["run", "--model", str(folders["lacking"]), "--task", str(folders["pairs"]), "--out", str(tmp_path),
                 "--no-progress", "--no-plots"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error: ") == 1 and "dense_4h_to_h.weight" in err, err
