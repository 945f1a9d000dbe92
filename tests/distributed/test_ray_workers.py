"""Sweeps on a local 2-worker Ray cluster equal the in-process results; a worker that dies mid-unit
has its unit run elsewhere (nothing lost or counted twice); an interrupted run resumes from its
unit checkpoints. One cluster for the session (``ray_cluster``), the same two actors for every test."""

from __future__ import annotations

import pytest
import torch

import atpstar
from atpstar.distributed import sweeps
from reference.faults import CrashOnce, Slow
from reference.models import assert_rel_close, build_hf, load, make_pairs

pytestmark = pytest.mark.ray
NODES = ["neuron", "query", "key", "value", "head"]
REL = 1e-12  # float64 models: batch composition changes only rounding


@pytest.fixture(scope="module")
def setting():
    """A GPT-2 (shipped as config + state_dict) and a Llama whose RMSNorm the tests swapped (shipped as
    the pickled module), with their pairs."""
    return {f: (load(build_hf(f)), make_pairs(n_pairs=3, seq_len=5)) for f in ("gpt2", "llama")}


def _same(result, expected, what):
    for t in expected.per_pair:
        assert_rel_close(result.per_pair[t], expected.per_pair[t], REL, f"{what} {t}")
    assert result.info["workers"] == 2


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_activation_patching_equals_in_process(ray_cluster, setting, family):
    model, pairs = setting[family]
    expected = atpstar.attribute(model, pairs, "activation_patching", nodes=NODES)
    result = atpstar.attribute(model, pairs, "activation_patching", nodes=NODES, workers=2, direction="noising")
    _same(result, expected, family)
    assert result.info["base_metric"] == pytest.approx(expected.info["base_metric"], rel=1e-12)
    # Cost: the same patched forwards, plus 2 forwards per pair each time a worker prepared a pair block.
    patched = expected.cost.forward - 2 * pairs.n_pairs
    prepared = result.cost.forward - patched
    assert prepared >= 2 * pairs.n_pairs and prepared == pytest.approx(round(prepared))


@pytest.mark.parametrize(
    ("method", "options"),
    [("subsampling", {"samples": 8, "p": 0.3, "batch_size": 2}), ("blocks", {"block_size": 3}), ("hierarchical", {})],
)
def test_estimators_equal_in_process(ray_cluster, setting, method, options):
    model, pairs = setting["gpt2"]
    expected = atpstar.attribute(model, pairs, method, nodes=["neuron", "head"], **options)
    result = atpstar.attribute(model, pairs, method, nodes=["neuron", "head"], workers=2, **options)
    _same(result, expected, method)
    for key, value in expected.extras.items():
        assert_rel_close(result.extras[key].double(), value.double(), REL, key)
    if method == "subsampling":  # whole in-process batches per unit: the very same forwards
        assert result.cost.forward - result.info["prepare_runs"] * 2 * pairs.n_pairs == pytest.approx(
            expected.cost.forward - 2 * pairs.n_pairs
        )


@pytest.mark.parametrize(
    ("method", "nodes"),
    [("atp", NODES), ("atp*", NODES), ("atp+qkfix", ["query", "key"]), ("atp+graddrop", ["neuron", "head"]),
     ("atp+ig", ["neuron", "value"]), ("atp*", ["edge"])],
)  # fmt: skip
def test_methods_whose_pairs_do_not_interact_run_by_pair_blocks(ray_cluster, setting, method, nodes):
    """No code of their own: whole calls on blocks of pairs, merged by ``Attribution.concat`` (float64)."""
    model, pairs = setting["llama"]
    expected = atpstar.attribute(model, pairs, method, nodes=nodes)
    result = atpstar.attribute(model, pairs, method, nodes=nodes, workers=2)
    _same(result, expected, method)
    for t in expected.scores:
        assert_rel_close(result.scores[t], expected.scores[t], REL, f"{method} scores {t}")
    assert result.cost.forward_equivalents == pytest.approx(expected.cost.forward_equivalents)
    assert result.identity == expected.identity and result.info["units"] == pairs.n_pairs


def test_verify_and_bound_equal_in_process(ray_cluster, setting):
    model, pairs = setting["llama"]
    estimate = atpstar.attribute(model, pairs, "atp", nodes=NODES)
    expected = atpstar.verify(model, pairs, estimate, budget=30)
    result = atpstar.verify(model, pairs, estimate, budget=30, workers=2)
    assert result.nodes == expected.nodes and result.info["workers"] == 2
    assert_rel_close(result.effects, expected.effects, REL, "verify effects")
    kwargs = dict(theta=0.05, samples=8, p=0.2, batch_size=2)
    bound = atpstar.false_negative_bound(model, pairs, expected, **kwargs)
    spread = atpstar.false_negative_bound(model, pairs, expected, workers=2, **kwargs)
    assert spread.info["workers"] == 2
    assert spread.max_effect_upper == pytest.approx(bound.max_effect_upper, rel=REL)
    assert spread.prob_upper == pytest.approx(bound.prob_upper, rel=REL)
    assert spread.worst_node == bound.worst_node


def test_worker_dying_mid_unit_is_retried_elsewhere(ray_cluster, setting, tmp_path, monkeypatch):
    model, pairs = setting["gpt2"]
    expected = atpstar.attribute(model, pairs, "activation_patching", nodes=["head", "value"])
    plan = sweeps.plan_patch_units
    marker = tmp_path / "crashed"

    def with_a_crash(*args, **kwargs):
        units = plan(*args, **kwargs)
        return [CrashOnce(units[0], str(marker)), *units[1:]]

    monkeypatch.setattr(sweeps, "plan_patch_units", with_a_crash)
    result = atpstar.attribute(
        model, pairs, "activation_patching", nodes=["head", "value"], workers=2, checkpoint=str(tmp_path / "ck")
    )
    assert marker.exists(), "the crashing unit never ran"
    assert result.info["units_retried"] == 1
    _same(result, expected, "after a worker died")
    # Nothing counted twice: one checkpoint file per unit, and the patched forwards of the in-process run.
    assert len(list((tmp_path / "ck").glob("patch_*.safetensors"))) == result.info["units"]
    patched = expected.cost.forward - 2 * pairs.n_pairs
    assert (result.cost.forward - patched) == pytest.approx(2 * pairs.n_pairs / 3 * result.info["prepare_runs"])


def test_interrupted_run_resumes_from_unit_checkpoints(ray_cluster, setting, tmp_path, monkeypatch):
    from atpstar.distributed.store import UnitStore

    model, pairs = setting["llama"]
    expected = atpstar.attribute(model, pairs, "activation_patching", nodes=["key", "neuron"])
    folder = tmp_path / "truth"
    real_save = UnitStore.save

    def interrupt_after_two(self, unit, result):
        real_save(self, unit, result)
        if len(list(folder.glob("patch_*.safetensors"))) == 2:
            raise KeyboardInterrupt  # Ctrl-C while other units are still running on the workers

    monkeypatch.setattr(UnitStore, "save", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        atpstar.attribute(model, pairs, "activation_patching", nodes=["key", "neuron"], workers=2,
                          checkpoint=str(folder))
    monkeypatch.setattr(UnitStore, "save", real_save)
    resumed = atpstar.attribute(model, pairs, "activation_patching", nodes=["key", "neuron"], workers=2,
                                checkpoint=str(folder))
    assert resumed.info["units_resumed"] == 2 and resumed.info["units"] > 2
    assert len(list(folder.glob("patch_*.safetensors"))) == resumed.info["units"]
    _same(resumed, expected, "resumed")


def test_ctrl_c_stops_the_workers_keeps_finished_units_and_resumes(ray_cluster, setting, tmp_path, monkeypatch):
    """SIGINT while a long unit runs: the call stops at once, the busy worker is stopped (the rerun does not
    wait for the abandoned unit), the finished units stay on disk and the rerun resumes from them."""
    import os
    import signal
    import threading
    import time

    model, pairs = setting["gpt2"]
    kwargs = dict(nodes=["head", "value"], workers=2, checkpoint=str(tmp_path / "ck"))
    expected = atpstar.attribute(model, pairs, "activation_patching", nodes=["head", "value"])
    plan = sweeps.plan_patch_units
    monkeypatch.setattr(sweeps, "plan_patch_units", lambda *a, **k: [Slow(u, 120.0) for u in plan(*a, **k)[:1]]
                        + plan(*a, **k)[1:])  # fmt: skip
    folder = tmp_path / "ck"

    def ctrl_c_after_two_units() -> None:
        while len(list(folder.glob("patch_*.safetensors"))) < 2:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c_after_two_units, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        atpstar.attribute(model, pairs, "activation_patching", **kwargs)
    assert time.monotonic() - start < 60, "Ctrl-C was not acted on while the long unit ran"
    finished = len(list(folder.glob("patch_*.safetensors")))
    assert finished >= 2
    monkeypatch.setattr(sweeps, "plan_patch_units", plan)
    start = time.monotonic()
    resumed = atpstar.attribute(model, pairs, "activation_patching", **kwargs)
    assert time.monotonic() - start < 60, "the rerun waited for the unit abandoned on a worker"
    assert resumed.info["units_resumed"] == finished
    assert len(list(folder.glob("patch_*.safetensors"))) == resumed.info["units"]
    _same(resumed, expected, "resumed after Ctrl-C")
    patched = expected.cost.forward - 2 * pairs.n_pairs
    assert resumed.cost.forward >= patched  # every unit counted, none twice (one file each)


def test_a_checkpoint_folder_started_in_process_resumes_on_workers(ray_cluster, setting, tmp_path):
    """The same units in-process and on workers: a bound checkpointed in-process needs no work on workers."""
    model, pairs = setting["gpt2"]
    kwargs = dict(nodes=["head", "value"], theta=0.05, samples=8, p=0.3, batch_size=2, checkpoint=str(tmp_path / "b"))
    here = atpstar.false_negative_bound(model, pairs, [], **kwargs)
    there = atpstar.false_negative_bound(model, pairs, [], workers=2, **kwargs)
    assert there.info["units_resumed"] == there.info["units"] == here.info["units"]
    assert there.max_effect_upper == here.max_effect_upper and there.worst_node == here.worst_node


def test_cli_runs_verifies_and_bounds_on_workers(ray_cluster, tmp_path, capsys):
    """The CLI's --workers on a model folder: workers load the folder themselves (no weights shipped)."""
    from atpstar.cli import main
    from test_cli import make_tiny, write_pairs

    folder, pairs_file = make_tiny(tmp_path / "model"), write_pairs(tmp_path / "pairs.jsonl")
    common = ["--model", str(folder), "--task", str(pairs_file), "--no-progress", "--no-plots", "--workers", "2"]
    assert main(["run", *common, "--method", "activation_patching", "--nodes", "head", "--out", str(tmp_path / "r")]) == 0
    saved = atpstar.Attribution.load(tmp_path / "r" / "estimate")
    assert saved.info["workers"] == 2
    assert not (tmp_path / "r" / "estimate.units").exists(), "the finished sweep's unit files are cleaned up"
    model = atpstar.load_model(str(folder))
    pairs = atpstar.read_pairs_jsonl(str(pairs_file), model.tokenizer)
    expected = atpstar.attribute(model, pairs, "activation_patching", nodes=["head"])
    assert_rel_close(saved.per_pair["head"], expected.per_pair["head"], 1e-5, "CLI run on workers")  # float32
    assert main(["verify", *common, "--estimate", str(tmp_path / "r" / "estimate"), "--budget", "6",
                 "--out", str(tmp_path / "v")]) == 0
    assert main(["bound", *common, "--verified", str(tmp_path / "v" / "verified"), "--theta", "0.05",
                 "--samples", "8", "--out", str(tmp_path / "b")]) == 0
    assert "max_effect_upper" in capsys.readouterr().out


def squared_margin(logits, answer, distractor):
    """A user metric in a module the workers cannot import (this test file is not on their path)."""
    rows = torch.arange(len(answer))
    return (logits[rows, answer] - logits[rows, distractor]) ** 2


def test_metric_from_a_module_workers_cannot_import(ray_cluster, setting):
    model, _ = setting["gpt2"]
    pairs = make_pairs(n_pairs=2, seq_len=5, metric=squared_margin)
    expected = atpstar.attribute(model, pairs, "activation_patching", nodes=["head"])
    result = atpstar.attribute(model, pairs, "activation_patching", nodes=["head"], workers=2)
    _same(result, expected, "custom metric")
