"""The command line with a MIB task: ``--task mib:<task>[:<split>]`` reads MIB's files into pairs of several lengths."""

from __future__ import annotations

import json

import mib_fixtures as fx
import pytest
import torch

from atpstar.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("mib_cli")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=32, max_position_embeddings=40, bos_token_id=1, eos_token_id=1)  # fmt: skip
    LlamaForCausalLM(config).eval().save_pretrained(root / "model")
    fx.tokenizer().save_pretrained(root / "model")
    return root / "model", fx.write(root / "ioi", "ioi", "jsonl")


def test_circuit_command_on_a_mib_task(tiny, tmp_path, capsys):
    model, data = tiny
    out = tmp_path / "circuit"
    args = ["circuit", "--model", str(model), "--task", "mib:ioi:test", "--mib-path", str(data), "--method", "atp",
            "--n-pairs", "3", "--fractions", "0,0.1,1", "--out", str(out), "--no-progress", "--no-plots"]  # fmt: skip
    assert main(args) == 0
    assert "MIB ioi (test, 3 pairs, s2_io_flip_counterfactual" in (out / "circuit_table.md").read_text()
    curve = json.loads((out / "atp.faithfulness.json").read_text())
    assert len(curve["faithfulness"]) == 3


@pytest.mark.parametrize("task", ["mib:sst2", "mib:ioi:dev", "mib:ioi:test:x"])
def test_bad_mib_tasks_fail_before_the_model_loads(task, tmp_path, capsys):
    code = main(["circuit", "--model", str(tmp_path / "absent"), "--task", task, "--out", str(tmp_path / "o")])
    assert code == 2 and "bad MIB task" in capsys.readouterr().err
