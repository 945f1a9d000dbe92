"""Atomic, versioned, self-checking files: every way a saved file can be wrong is a clear error."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from atpstar import Attribution, Cost
from atpstar.errors import CorruptFileError, InputError
from atpstar.persist import FORMAT_VERSION, bundle_base, load_bundle, load_json, save_bundle, save_json, to_jsonable
from atpstar.verify import Verification


def _attr(value: float) -> Attribution:
    per_pair = {"head": torch.full((2, 1, 2, 3), value)}
    return Attribution(
        "atp",
        {"x": 1},
        "noising",
        "logit_diff",
        "m",
        per_pair,
        {"head": per_pair["head"].mean(0)},
        "mean",
        Cost(1, 2),
        info={"seed": value},
    )


def test_name_is_used_as_given(tmp_path) -> None:
    a, b = _attr(1.0), _attr(2.0)
    a.save(tmp_path / "d" / "seed.1")
    b.save(tmp_path / "d" / "seed.2")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "seed.1.json",
        "seed.1.safetensors",
        "seed.2.json",
        "seed.2.safetensors",
    ]
    assert float(Attribution.load(tmp_path / "d" / "seed.1").scores["head"][0, 0, 0]) == 1.0
    assert float(Attribution.load(str(tmp_path / "d" / "seed.2.json")).scores["head"][0, 0, 0]) == 2.0
    assert bundle_base("x/a.safetensors").name == "a" and bundle_base("x/a.b.c").name == "a.b.c"
    assert not list((tmp_path / "d").glob("*.tmp")), "temporary files left behind"


def test_corrupt_truncated_mixed_and_wrong_kind(tmp_path) -> None:
    _attr(1.0).save(tmp_path / "a")
    _attr(2.0).save(tmp_path / "b")
    # halves of two different saves
    (tmp_path / "a.safetensors").write_bytes((tmp_path / "b.safetensors").read_bytes())
    with pytest.raises(CorruptFileError, match="does not match"):
        Attribution.load(tmp_path / "a")
    # truncated tensors
    data = (tmp_path / "b.safetensors").read_bytes()
    (tmp_path / "b.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError):
        Attribution.load(tmp_path / "b")
    # truncated JSON
    _attr(3.0).save(tmp_path / "c")
    text = (tmp_path / "c.json").read_text()
    (tmp_path / "c.json").write_text(text[: len(text) // 2])
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        Attribution.load(tmp_path / "c")
    # one half missing
    _attr(4.0).save(tmp_path / "d")
    (tmp_path / "d.safetensors").unlink()
    with pytest.raises(CorruptFileError, match="missing"):
        Attribution.load(tmp_path / "d")
    # an attribution read as a verification
    _attr(5.0).save(tmp_path / "e")
    with pytest.raises(CorruptFileError, match="not a saved verification"):
        Verification.load(tmp_path / "e")
    # nothing there
    with pytest.raises(InputError, match="no saved attribution"):
        Attribution.load(tmp_path / "nothing")


def test_format_version_checked(tmp_path) -> None:
    save_bundle(tmp_path / "x", "thing", {"a": 1}, {"t": torch.zeros(2)})
    meta, tensors = load_bundle(tmp_path / "x", "thing")
    assert meta["a"] == 1 and meta["format_version"] == FORMAT_VERSION and tensors["t"].shape == (2,)
    data = json.loads((tmp_path / "x.json").read_text())
    data["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "x.json").write_text(json.dumps(data))
    with pytest.raises(CorruptFileError, match="format version"):
        load_bundle(tmp_path / "x", "thing")
    save_json(tmp_path / "y.json", "evaluation", {"b": [1, 2]})
    assert load_json(tmp_path / "y.json", "evaluation")["b"] == [1, 2]
    with pytest.raises(CorruptFileError, match="not a saved bound"):
        load_json(tmp_path / "y.json", "bound")
    (tmp_path / "z.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CorruptFileError):
        load_json(tmp_path / "z.json", "bound")


def test_to_jsonable() -> None:
    value = {1: (torch.tensor(2.5), torch.tensor([1, 2]), np.float32(0.5), np.arange(2), math.nan, -math.inf, None)}
    assert to_jsonable(value) == {"1": [2.5, [1, 2], 0.5, [0, 1], "nan", "-inf", None]}
    json.dumps(to_jsonable(value), allow_nan=False)  # strict JSON


def test_unwritable_target_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="cannot write"):
        _attr(1.0).save(tmp_path / "file" / "a")  # a folder that is a file: fails as a read-only one does
