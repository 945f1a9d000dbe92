"""Resume of an interrupted ``atpstar.find`` (``find.journal``): interrupted runs end where uninterrupted
ones do, with the whole work's cost; completed steps are not redone; another computation's checkpoint
is refused naming what differs; a truncated one is reported and recomputed."""

from __future__ import annotations

import sys

import pytest
import torch

import atpstar
from atpstar.find import calibrate as find_calibrate
from atpstar.find import state as find_state
from atpstar.find.localization import Localization
from reference.toys import sparse_additive_toy
from test_find import _misleading_estimate


@pytest.fixture(scope="module")
def planted():
    model, pairs = sparse_additive_toy(planted=True, seq_len=8, d_mlp=128)  # 1,024 neurons per pair
    truth = atpstar.attribute(model, pairs, "activation_patching", nodes=["neuron"])
    exact = truth.scores["neuron"]
    hide = tuple(int(i) for i in torch.nonzero(exact.abs() == exact.abs().max())[0])
    theta = 0.5 * float(exact.abs().max())
    return model, pairs, theta, _misleading_estimate(truth, hide)


class _Calls:
    """Counts calls of a wrapped step and raises ``error`` on call number ``fail_on`` (1-based)."""

    def __init__(self, function, fail_on: int | None = None, error: type[BaseException] = RuntimeError) -> None:
        self.function, self.fail_on, self.error, self.calls = function, fail_on, error, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise self.error("injected interruption")
        return self.function(*args, **kwargs)


def _same(a: Localization, b: Localization) -> None:
    assert a.nodes == b.nodes and a.certified == b.certified and repr(a.history) == repr(b.history)  # nan-safe
    assert a.verified.nodes == b.verified.nodes and a.verified.info["stage"] == b.verified.info["stage"]
    torch.testing.assert_close(a.effects, b.effects, rtol=0, atol=0)
    torch.testing.assert_close(a.verified.effects, b.verified.effects, rtol=0, atol=0)
    assert a.cost == b.cost and a.total_cost == b.total_cost
    assert (a.bound is None) == (b.bound is None)
    if a.bound is None or b.bound is None:
        return
    assert a.bound.max_effect_upper == b.bound.max_effect_upper and repr(a.bound.info) == repr(b.bound.info)
    for t in a.bound.upper:
        torch.testing.assert_close(a.bound.upper[t], b.bound.upper[t], rtol=0, atol=0, equal_nan=True)


def test_interrupted_in_the_calibration_resumes_to_the_uninterrupted_result(planted, tmp_path, monkeypatch):
    """Round 1's bound flags the hidden node, it is verified, and the same bound is calibrated: an interruption
    after the calibration's exact patches resumes with every expensive step replayed."""
    model, pairs, theta, estimate = planted
    # One bound costs more than 10 % of exhaustive patching on this small toy: allow the gamble.
    run = {"nodes": ["neuron"], "estimator": estimate, "patience": 4, "seed": 3, "max_overspend": 1.0}
    whole = atpstar.find(model, pairs, theta, **run)
    assert whole.certified_by == "bound" and [row["stage"] for row in whole.history][-2:] == ["bound", "calibrate"]
    assert whole.history[-2]["n_flagged"] >= 1  # round 1 flagged the hidden node
    path = tmp_path / "find.ckpt.safetensors"

    verdict = _Calls(find_calibrate.calibrate, fail_on=1)  # after the calibration's patches are journaled
    monkeypatch.setattr(find_calibrate, "calibrate", verdict)
    with pytest.raises(RuntimeError, match="injected"):
        atpstar.find(model, pairs, theta, checkpoint=path, **run)
    assert path.is_file() and not list(tmp_path.glob("*.tmp"))

    monkeypatch.setattr(find_calibrate, "calibrate", verdict.function)
    bound = _Calls(find_state.false_negative_bound)
    verify = _Calls(find_state.patch_nodes)
    monkeypatch.setattr(find_state, "false_negative_bound", bound)
    monkeypatch.setattr(find_state, "patch_nodes", verify)
    resumed = atpstar.find(model, pairs, theta, checkpoint=path, **run)
    _same(resumed, whole)
    assert bound.calls == 0 and verify.calls == 0  # nothing expensive ran again
    windows = -(-whole.history[0]["verified"] // run["patience"])  # stage 1 verifies in windows of `patience`
    # stage-1 windows, round 1's bound, its verification of the flagged node, the calibration's patches
    assert resumed.info["resumed"]["steps"] == windows + 3
    assert resumed.total_cost.forward_equivalents == pytest.approx(whole.total_cost.forward_equivalents)


def test_ctrl_c_during_the_first_bound_keeps_the_estimate_and_verified_nodes(planted, tmp_path, monkeypatch):
    model, pairs, theta, _ = planted
    run = {"nodes": ["neuron"], "estimator": "atp", "patience": 4, "max_overspend": 1.0}  # a bound must fit
    whole = atpstar.find(model, pairs, theta, **run)
    monkeypatch.setattr(
        find_state, "false_negative_bound", _Calls(find_state.false_negative_bound, 1, KeyboardInterrupt)
    )
    with pytest.raises(KeyboardInterrupt):
        atpstar.find(model, pairs, theta, out_dir=tmp_path, **run)
    monkeypatch.undo()
    find_module = sys.modules["atpstar.find.loop"]  # (the package's ``find`` is the function)
    attribute, verify = _Calls(find_module.attribute), _Calls(find_state.patch_nodes)
    monkeypatch.setattr(find_module, "attribute", attribute)
    monkeypatch.setattr(find_state, "patch_nodes", verify)
    resumed = atpstar.find(model, pairs, theta, out_dir=tmp_path, **run)
    _same(resumed, whole)
    assert attribute.calls == 0 and verify.calls == 0 and resumed.cost["estimate"] == whole.cost["estimate"]
    windows = -(-whole.history[0]["verified"] // 4)  # stage 1 verifies in windows of patience = 4
    assert resumed.info["resumed"]["steps"] == 1 + windows  # the estimate and every window
    assert Localization.load(tmp_path / "localization").nodes == whole.nodes  # out_dir also gets the result

    # A finished run's checkpoint replays every step: nothing is computed again.
    monkeypatch.setattr(find_state, "false_negative_bound", _Calls(find_state.false_negative_bound, 1))
    again = atpstar.find(model, pairs, theta, out_dir=tmp_path, **run)
    _same(again, whole)


def test_another_computation_is_refused_naming_what_differs(planted, tmp_path):
    model, pairs, theta, estimate = planted
    path = tmp_path / "find.ckpt.safetensors"
    run = {"nodes": ["neuron"], "estimator": estimate, "patience": 4, "budget": 40.0}
    atpstar.find(model, pairs, theta, checkpoint=path, **run)
    for change, named in (
        ({"theta": theta * 2}, "theta"),
        ({"alpha": 0.01}, "alpha"),
        ({"estimator": "atp"}, "estimator"),
        ({"seed": 7}, "seed, patience"),
    ):
        options = {**run, **change}
        with pytest.raises(atpstar.AtpstarError, match=named):
            atpstar.find(model, pairs, options.pop("theta", theta), checkpoint=path, **options)
    with pytest.raises(atpstar.AtpstarError, match="prompt pairs"):
        atpstar.find(model, pairs.subset([0]), theta, checkpoint=path, nodes=["neuron"], estimator="atp", patience=4)
    other, _ = sparse_additive_toy(planted=False, seq_len=8, d_mlp=128)
    with pytest.raises(atpstar.AtpstarError, match="weights"):
        atpstar.find(other, pairs, theta, checkpoint=path, **run)
    fresh = atpstar.find(model, pairs, theta * 2, checkpoint=path, recompute=True, **run)
    assert "resumed" not in fresh.info and fresh.theta == theta * 2


def test_larger_budget_continues_where_the_checkpoint_ends(planted, tmp_path):
    model, pairs, theta, estimate = planted
    path = tmp_path / "find.ckpt.safetensors"
    run = {"nodes": ["neuron"], "estimator": estimate, "patience": 4}
    short = atpstar.find(model, pairs, theta, checkpoint=path, budget=700.0, **run)
    assert not short.certified
    with pytest.warns(UserWarning, match="differs from the saved one"):
        longer = atpstar.find(model, pairs, theta, checkpoint=path, **run)
    _same(longer, atpstar.find(model, pairs, theta, **run))


def test_truncated_checkpoint_is_reported_and_recomputed(planted, tmp_path):
    model, pairs, theta, estimate = planted
    path = tmp_path / "find.ckpt.safetensors"
    run = {"nodes": ["neuron"], "estimator": estimate, "patience": 4, "budget": 60.0}  # stage 1 only: cheap
    whole = atpstar.find(model, pairs, theta, checkpoint=path, **run)
    assert whole.verified.n_verified > 0
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="unusable"):
        again = atpstar.find(model, pairs, theta, checkpoint=path, **run)
    _same(again, whole)
    assert "resumed" not in again.info
    with pytest.raises(atpstar.InputError, match="folder"):
        atpstar.find(model, pairs, theta, checkpoint=tmp_path, **run)


def test_a_verification_interrupted_midway_keeps_its_finished_layers(tmp_path, monkeypatch):
    """Two-layer toy: each verification call is journaled per layer, so a kill inside a call loses one layer."""
    model = atpstar.load_model("toy-ioi")
    pairs = atpstar.tasks.ioi(model.tokenizer, 2, seed=0).subset([0])
    run = {"nodes": ["query", "key", "value", "head"], "estimator": "atp", "patience": 64, "max_rounds": 1}
    counting = _Calls(find_state.patch_ranked)
    monkeypatch.setattr(find_state, "patch_ranked", counting)
    whole = atpstar.find(model, pairs, 0.3, **run)
    total = counting.calls  # one call per layer: the toy's nodes cost less to patch exhaustively than to bound
    assert total >= 2 and "exhaustive patching" in whole.certificate()["fallback"]
    path = tmp_path / "find.ckpt.safetensors"
    monkeypatch.setattr(find_state, "patch_ranked", _Calls(counting.function, total, KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        atpstar.find(model, pairs, 0.3, checkpoint=path, **run)
    resumed_calls = _Calls(counting.function)
    monkeypatch.setattr(find_state, "patch_ranked", resumed_calls)
    resumed = atpstar.find(model, pairs, 0.3, checkpoint=path, **run)
    assert resumed_calls.calls == 1  # the interrupted (last) layer; the layers before it were kept
    _same(resumed, whole)
