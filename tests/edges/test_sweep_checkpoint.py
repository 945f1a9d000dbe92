"""The exact edge sweep's checkpoint (the ``edges`` folder of unit files in the checkpoint folder): resumed
only by the same computation, refused with the differences named otherwise, and a truncated unit file
reported and recomputed."""

from __future__ import annotations

import pytest

import atpstar
from atpstar.sweeps import edges as sweep
from reference.models import assert_rel_close, build_hf, load, make_pairs


@pytest.fixture(scope="module")
def setup():
    model = load(build_hf("gpt2", n_layers=2, seed=3))
    pairs = make_pairs(n_pairs=2, seq_len=5, seed=4)
    full = atpstar.attribute(model, pairs, method="activation_patching", nodes=["edge"])
    return model, pairs, full


def _interrupted(model, pairs, path, monkeypatch, after=3, **options):
    """Run exact edge patching with a checkpoint and stop it after ``after`` batches."""
    calls = {"n": 0}
    real = sweep.patch_edges

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "patch_edges", failing)
    with pytest.raises(KeyboardInterrupt):
        atpstar.attribute(
            model, pairs, method="activation_patching", nodes=["edge"], checkpoint=str(path), batch_size=16, **options
        )
    monkeypatch.setattr(sweep, "patch_edges", real)


def test_interrupted_sweep_resumes_to_the_same_numbers_and_cost(setup, tmp_path, monkeypatch):
    model, pairs, full = setup
    path = tmp_path / "truth.ckpt"
    _interrupted(model, pairs, path, monkeypatch)
    saved = tmp_path / "truth.ckpt" / "edges"
    assert list(saved.glob("edges_*.safetensors"))
    resumed = atpstar.attribute(
        model, pairs, method="activation_patching", nodes=["edge"], checkpoint=str(path), batch_size=16
    )
    assert_rel_close(resumed.per_pair["edge"], full.per_pair["edge"], 1e-12, "resumed")
    assert resumed.info["edge_resumed_from"] == str(saved)
    # The whole computation's cost (saved part + the rest), as if it had run once; work lost to the kill
    # is not counted twice (as the node sweep's checkpoint).
    assert resumed.cost.forward == pytest.approx(full.cost.forward)


@pytest.mark.parametrize("change", ["model", "pairs", "metric", "direction", "edge_positions"])
def test_another_computation_is_refused_naming_what_differs(setup, tmp_path, monkeypatch, change):
    model, pairs, _ = setup
    path = tmp_path / "truth.ckpt"
    _interrupted(model, pairs, path, monkeypatch)
    kwargs = {"checkpoint": str(path)}
    expected = {
        "model": "model weights",
        "pairs": "prompt pairs",
        "metric": "metric \\(saved",
        "direction": "direction",
        "edge_positions": "method options",
    }[change]
    if change == "model":
        model = load(build_hf("gpt2", n_layers=2, seed=5))
    elif change == "pairs":
        pairs = make_pairs(n_pairs=2, seq_len=5, seed=8)
    elif change == "metric":
        pairs = make_pairs(n_pairs=2, seq_len=5, seed=4, metric="logprob")
    elif change == "direction":
        kwargs["direction"] = "denoising"
    else:
        kwargs["edge_positions"] = True
    with pytest.raises(atpstar.AtpstarError, match=expected):
        atpstar.attribute(model, pairs, method="activation_patching", nodes=["edge"], **kwargs)


def test_truncated_checkpoint_is_reported_and_recomputed(setup, tmp_path, monkeypatch):
    model, pairs, full = setup
    path = tmp_path / "truth.ckpt"
    _interrupted(model, pairs, path, monkeypatch)
    for unit_file in (tmp_path / "truth.ckpt" / "edges").glob("edges_*.safetensors"):
        unit_file.write_bytes(unit_file.read_bytes()[: unit_file.stat().st_size // 2])
    with pytest.warns(UserWarning, match="unreadable"):
        again = atpstar.attribute(model, pairs, method="activation_patching", nodes=["edge"], checkpoint=str(path))
    assert_rel_close(again.per_pair["edge"], full.per_pair["edge"], 1e-12, "recomputed")
    assert again.cost.forward == pytest.approx(full.cost.forward)
    assert "edge_resumed_from" not in again.info
