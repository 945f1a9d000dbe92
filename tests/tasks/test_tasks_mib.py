"""tasks.mib: MIB's released files (parquet, jsonl, csv; local folder or hub id) read as MIB's loader reads them."""

from __future__ import annotations

import importlib.util

import mib_fixtures as fx
import pytest
import torch

import atpstar
from atpstar.errors import InputError
from atpstar.tasks.mib import TASKS, read_rows

FORMATS = ["jsonl", "csv"] + (["parquet"] if importlib.util.find_spec("pyarrow") else [])


@pytest.fixture(scope="module")
def tok():
    return fx.tokenizer()


def ids(tok, words: str) -> list[int]:
    return tok.encode(words, add_special_tokens=False)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_and_format_reads_the_same_pairs(tmp_path, tok, task, fmt):
    reference = atpstar.tasks.mib(task, "train", tokenizer=tok, path=fx.write(tmp_path / "jsonl", task, "jsonl"))
    pairs = atpstar.tasks.mib(task, "train", tokenizer=tok, path=fx.write(tmp_path / fmt, task, fmt))
    assert pairs.fingerprint() == reference.fingerprint()
    assert pairs.info["task"] == task and pairs.info["split"] == "train"


def test_ioi_follows_mibs_columns_filters_and_bos(tmp_path, tok):
    pairs = atpstar.tasks.mib("ioi", "validation", tokenizer=tok, path=fx.write(tmp_path, "ioi"))
    rows = fx.ioi_rows()
    kept = rows[:4]  # row 4: random_c of two tokens; row 5: noise one token longer than clean
    assert pairs.n_pairs == 4 and pairs.info["dropped_by_filter"] == 1 and pairs.info["dropped_unequal_length"] == 1
    assert pairs.answer.tolist() == [ids(tok, " " + r["metadata"]["indirect_object"])[0] for r in kept]
    assert pairs.distractor.tolist() == [ids(tok, " " + r["metadata"]["subject"])[0] for r in kept]
    bos = tok.bos_token_id
    for i, row in enumerate(kept):
        group = pairs.subset([i])
        assert group.clean[0].tolist() == [bos, *ids(tok, row["prompt"])]
        assert group.noise[0].tolist() == [bos, *ids(tok, row["s2_io_flip_counterfactual"]["prompt"])]
    assert pairs.lengths.tolist() == [len(ids(tok, r["prompt"])) + 1 for r in kept]
    assert torch.equal(pairs.answer_positions, pairs.lengths - 1)
    other = atpstar.tasks.mib("ioi", "validation", tokenizer=tok, path=tmp_path, counterfactual="abc_counterfactual")
    assert other.subset([0]).noise[0].tolist() == [bos, *ids(tok, rows[0]["abc_counterfactual"]["prompt"])]
    plain = atpstar.tasks.mib("ioi", "validation", tokenizer=tok, path=tmp_path, prepend_bos=False)
    assert plain.subset([0]).clean[0].tolist() == ids(tok, rows[0]["prompt"])


@pytest.mark.parametrize("task", ["mcqa", "arc_easy", "arc_challenge"])
def test_choices_give_the_letters_of_the_answer_and_of_the_counterfactual_answer(tmp_path, tok, task):
    pairs = atpstar.tasks.mib(task, "test", tokenizer=tok, path=fx.write(tmp_path, task))
    letters = {"A": ids(tok, "A")[0], "B": ids(tok, "B")[0], "C": ids(tok, "C")[0]}
    assert [pairs.answer.tolist(), pairs.distractor.tolist()] == [
        [letters["A"], letters["B"], letters["B"]],
        [letters["B"], letters["C"], letters["A"]],
    ]
    assert sorted(set(pairs.lengths.tolist())) == [25, 33]


@pytest.mark.parametrize("task, operator", [("arithmetic_addition", "+"), ("arithmetic_subtraction", "-")])
def test_arithmetic_keeps_its_operator_and_single_token_labels(tmp_path, tok, task, operator):
    pairs = atpstar.tasks.mib(task, "validation", tokenizer=tok, path=fx.write(tmp_path, task))
    rows = [r for r in fx.arithmetic_rows() if r["operator"] == operator and r["random_counterfactual"]]
    rows = [r for r in rows if len(str(r["label"])) == 1 and len(str(r["random_counterfactual"]["label"])) == 1]
    assert pairs.answer.tolist() == [ids(tok, str(r["label"]))[0] for r in rows]
    assert pairs.distractor.tolist() == [ids(tok, str(r["random_counterfactual"]["label"]))[0] for r in rows]
    assert pairs.info["dropped_by_filter"] == 6 - len(rows)


def test_n_keeps_the_first_pairs_after_filtering(tmp_path, tok):
    folder = fx.write(tmp_path, "ioi", "jsonl")
    pairs = atpstar.tasks.mib("ioi", "validation", tokenizer=tok, path=folder, n=3)
    full = atpstar.tasks.mib("ioi", "validation", tokenizer=tok, path=folder)
    assert pairs.n_pairs == 3 and pairs.answer.tolist() == full.answer.tolist()[:3]


def test_hub_id_downloads_the_dataset_repository(tmp_path, tok, monkeypatch):
    import huggingface_hub

    folder = fx.write(tmp_path, "mcqa")
    asked = {}

    def snapshot_download(repo_id, repo_type):
        asked.update(repo_id=repo_id, repo_type=repo_type)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    pairs = atpstar.tasks.mib("mcqa", "validation", tokenizer=tok)
    assert asked == {"repo_id": "mib-bench/copycolors_mcqa", "repo_type": "dataset"}
    assert pairs.info["source"] == "mib-bench/copycolors_mcqa" and pairs.n_pairs == 3


def test_the_config_folder_is_preferred_and_shards_are_concatenated(tmp_path):
    fx.write(tmp_path, "mcqa")
    other = tmp_path / "2_answer_choices"
    other.mkdir()
    (other / "train.jsonl").write_text('{"prompt": "x"}\n')
    assert len(read_rows(tmp_path, "train", "4_answer_choices")) == 3
    (tmp_path / "data").mkdir()
    for shard in range(2):
        (tmp_path / "data" / f"test-0000{shard}-of-00002.jsonl").write_text('{"prompt": "x"}\n')
    assert len(read_rows(tmp_path / "data", "test")) == 2


@pytest.mark.parametrize(
    "call, match",
    [
        (dict(task="sst2"), "unknown MIB task"),
        (dict(task="ioi", split="dev"), "unknown split"),
        (dict(task="arc-easy", split="test", path="nowhere"), "neither an existing"),
    ],
)
def test_bad_requests_are_refused(tok, call, match):
    with pytest.raises(InputError, match=match):
        atpstar.tasks.mib(**call, tokenizer=tok)


def test_missing_split_files_and_columns_are_named(tmp_path, tok):
    folder = fx.write(tmp_path / "ioi", "ioi", "jsonl", splits=("train",))
    with pytest.raises(InputError, match=r"no 'test' files .*splits found there: \['train'\]"):
        atpstar.tasks.mib("ioi", "test", tokenizer=tok, path=folder)
    with pytest.raises(InputError, match="not in MIB's ioi schema.*no_such_counterfactual"):
        atpstar.tasks.mib("ioi", "train", tokenizer=tok, path=folder, counterfactual="no_such_counterfactual")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "train.jsonl").write_text('{"prompt": "When Mary"}\n')
    with pytest.raises(InputError, match="columns: \\['prompt'\\]"):
        atpstar.tasks.mib("mcqa", "train", tokenizer=tok, path=bare)
