"""Work units without Ray: plans cover a sweep exactly once, pieces merge to the one-piece result,
unit checkpoints resume (in-process executor), and bad input is refused before any work."""

from __future__ import annotations

import pytest
import torch

import atpstar
from atpstar.cost import Cost
from atpstar.distributed import sweeps, verify_units
from atpstar.distributed.units import WorkerState
from atpstar.engine import prepare
from atpstar.ops import welford_merge
from atpstar.sweeps.subsampling import subsample_range
from reference.models import assert_rel_close, build_hf, load, make_pairs

NODES = ["neuron", "query", "key", "value", "head"]


@pytest.fixture(scope="module")
def gpt2():
    return load(build_hf("gpt2", n_layers=3)), make_pairs(n_pairs=3, seq_len=5)


def test_patch_units_cover_every_pair_and_layer_once(gpt2):
    model, pairs = gpt2
    for target, layers in ((8, [0, 1, 2]), (2, [2, 0]), (40, [1])):
        units = sweeps.plan_patch_units(model, pairs, NODES, layers, target)
        seen = torch.zeros(pairs.n_pairs, model.n_layers, dtype=torch.long)
        for unit in units:
            for layer in unit.layers:
                seen[unit.pair_start : unit.pair_stop, layer] += 1
        expected = torch.zeros_like(seen)
        expected[:, layers] = 1
        assert torch.equal(seen, expected), (target, layers)
        assert len({u.name for u in units}) == len(units), "checkpoint names must be unique"


@pytest.mark.parametrize(("total", "batch", "target"), [(48, 48, 8), (1000, 7, 8), (10, 3, 8), (5, 100, 8)])
def test_sample_units_partition_the_elements_in_order(total, batch, target):
    units = sweeps.plan_sample_units(total, batch, 3, target)
    assert units[0].start == 0 and units[-1].stop == total
    assert all(a.stop == b.start for a, b in zip(units, units[1:]))
    if total // batch >= target:  # enough batches: ranges keep the in-process batches whole
        assert all(u.start % batch == 0 for u in units)


def test_rank_windows_partition_the_ranks():
    units = verify_units.plan_rank_units(50, 2, 8)
    assert [(u.start, u.stop) for u in units][0] == (0, 7)
    assert units[-1].stop == 50 and all(a.stop == b.start for a, b in zip(units, units[1:]))


def test_welford_merge_of_sample_ranges_equals_one_range(gpt2):
    model, pairs = gpt2
    cache = prepare(model, pairs, "noising", ["head", "value"], Cost())
    options = dict(samples=12, p=0.3, seed=4, design="random", batch=5, keep=None)
    whole = subsample_range(model, cache, ["head", "value"], 0, 36, cost=Cost(), **options)
    merged = {k: torch.zeros_like(v) for k, v in whole.items()}
    for start, stop in ((0, 10), (10, 25), (25, 36)):
        part = subsample_range(model, cache, ["head", "value"], start, stop, cost=Cost(), **options)
        for side in ("in", "out"):
            names = (f"count_{side}", f"mean_{side}", f"m2_{side}")
            merged.update(zip(names, welford_merge(*(merged[n] for n in names), *(part[n] for n in names))))
    assert float(whole["m2_in"].abs().max()) > 1e-3, "no spread: the test would be vacuous"
    for name, value in whole.items():
        assert_rel_close(merged[name], value, 1e-12, name)


def test_verify_with_checkpoint_resumes_after_interrupt(gpt2, tmp_path, monkeypatch):
    model, pairs = gpt2
    estimate = atpstar.attribute(model, pairs, "atp", nodes=NODES)
    expected = atpstar.verify(model, pairs, estimate, budget=40)
    calls = {"n": 0}
    real_run = WorkerState.run

    def interrupted(self, sweep, unit):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_run(self, sweep, unit)

    monkeypatch.setattr(WorkerState, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atpstar.verify(model, pairs, estimate, budget=40, checkpoint=str(tmp_path / "ck"))
    monkeypatch.setattr(WorkerState, "run", real_run)
    resumed = atpstar.verify(model, pairs, estimate, budget=40, checkpoint=str(tmp_path / "ck"))
    assert resumed.info["units_resumed"] == 3 and resumed.info["units"] == 8
    assert resumed.nodes == expected.nodes
    assert_rel_close(resumed.effects, expected.effects, 1e-12, "effects")
    # Units saved before the interrupt keep their cost: patched forwards equal the in-process count.
    patched = expected.cost.forward - 2 * pairs.n_pairs
    prepares = resumed.cost.forward - patched
    # The resumed run prepared again: that repeat is work lost to the interrupt, counted once (as one call).
    assert prepares == pytest.approx(2 * pairs.n_pairs)


def test_bound_with_checkpoint_equals_in_process(gpt2, tmp_path):
    model, pairs = gpt2
    verified = [("head", (2, 1, 4)), ("value", (0, 0, 1))]
    kwargs = dict(nodes=["head", "value"], theta=0.05, samples=8, p=0.3, batch_size=2)
    expected = atpstar.false_negative_bound(model, pairs, verified, **kwargs)
    pieces = atpstar.false_negative_bound(model, pairs, verified, checkpoint=str(tmp_path / "b"), **kwargs)
    assert pieces.info["units"] == 6  # 24 elements: 12 batches of 2, two per unit
    assert pieces.max_effect_upper == pytest.approx(expected.max_effect_upper, rel=1e-12)
    assert pieces.prob_upper == pytest.approx(expected.prob_upper, rel=1e-12)
    assert pieces.worst_node == expected.worst_node
    assert pieces.cost.forward == pytest.approx(expected.cost.forward)  # whole batches: same forwards
    again = atpstar.false_negative_bound(model, pairs, verified, checkpoint=str(tmp_path / "b"), **kwargs)
    assert again.info["units_resumed"] == 6 and again.max_effect_upper == pieces.max_effect_upper


def test_checkpoint_folder_of_another_sweep_is_refused(gpt2, tmp_path):
    model, pairs = gpt2
    verified = [("head", (0, 0, 0))]
    atpstar.false_negative_bound(model, pairs, verified, nodes=["head"], samples=4, checkpoint=str(tmp_path / "b"))
    with pytest.raises(atpstar.InputError, match="does not match this run: method options .samples: saved"):
        atpstar.false_negative_bound(model, pairs, verified, nodes=["head"], samples=6, checkpoint=str(tmp_path / "b"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(atpstar.InputError, match="is a file"):
        atpstar.false_negative_bound(model, pairs, verified, nodes=["head"], samples=4, checkpoint=str(tmp_path / "file"))


def test_torn_unit_file_is_reported_and_run_again(gpt2, tmp_path):
    model, pairs = gpt2
    estimate = atpstar.attribute(model, pairs, "atp", nodes=["head"])
    first = atpstar.verify(model, pairs, estimate, budget=10, checkpoint=str(tmp_path / "v"))
    unit_file = sorted((tmp_path / "v").glob("ranks*.safetensors"))[0]
    unit_file.write_bytes(unit_file.read_bytes()[:40])  # truncated
    with pytest.warns(UserWarning, match="unreadable"):
        again = atpstar.verify(model, pairs, estimate, budget=10, checkpoint=str(tmp_path / "v"))
    assert again.info["units_resumed"] == again.info["units"] - 1
    assert torch.equal(again.effects, first.effects)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"workers": 0}, "workers must be an integer >= 1"),
        ({"workers": "2"}, "workers must be an integer >= 1"),
        ({"workers": True}, "workers must be an integer >= 1"),
        ({"ray_address": "auto"}, "ray_address needs workers"),
        ({"workers": 2, "ray_address": 5}, "ray_address must be a string"),
    ],
)
def test_bad_worker_options_are_refused_before_ray(gpt2, kwargs, message):
    model, pairs = gpt2
    with pytest.raises(atpstar.InputError, match=message):
        atpstar.attribute(model, pairs, "activation_patching", nodes=["head"], **kwargs)


def test_methods_that_do_not_split_refuse_workers(gpt2):
    """No work units of its own, and its pairs cannot be split (seeded by the pair's place in the call)."""
    from atpstar.methods.base import Method

    class Seeded(Method):
        id = "seeded"
        seeded = True

    model, pairs = gpt2
    with pytest.raises(atpstar.InputError, match="does not run on workers.*activation_patching.*atp\\*"):
        Seeded().attribute(model, pairs, ["head"], workers=2)


def test_checkpoint_resumes_in_a_new_process(tmp_path):
    """The sweep key in ``sweep.json`` must not depend on the process (e.g. Python's salted ``hash``)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import sys; from reference.models import build_hf, load, make_pairs; import atpstar;"
        "m = load(build_hf('gpt2')); pairs = make_pairs(n_pairs=2, seq_len=5);"
        "b = atpstar.false_negative_bound(m, pairs, [('head', (0, 0, 1))], nodes=['head', 'key'], samples=4,"
        " batch_size=1, checkpoint=sys.argv[1]); print(b.info['units_resumed'], repr(b.max_effect_upper))"
    )
    tests = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent / "src"), str(tests)]), "OMP_NUM_THREADS": "1"}
    outputs = []
    for seed in ("1", "2"):
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ck")], capture_output=True, text=True,
                              env={**env, "PYTHONHASHSEED": seed}, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stdout.split())
    assert outputs[0][0] == "0" and int(outputs[1][0]) == 8  # the second process resumed every unit
    assert outputs[0][1] == outputs[1][1]


def test_unit_folder_of_other_weights_is_refused(tmp_path, gpt2):
    """Unit checkpoints carry the full identity: same model id and pairs but other weights are refused."""
    model, pairs = gpt2
    folder = str(tmp_path / "units")
    kwargs = dict(nodes=["head"], samples=4, batch_size=1, checkpoint=folder)
    first = atpstar.false_negative_bound(model, pairs, [("head", (0, 0, 0))], **kwargs)
    other = load(build_hf("gpt2", n_layers=3, seed=1))
    assert other.model_id == model.model_id
    with pytest.raises(atpstar.IdentityMismatchError, match="model weights"):
        atpstar.false_negative_bound(other, pairs, [("head", (0, 0, 0))], **kwargs)
    again = atpstar.false_negative_bound(model, pairs, [("head", (0, 0, 0))], **kwargs)
    assert again.info["units_resumed"] > 0 and again.max_effect_upper == first.max_effect_upper


def test_unreadable_unit_manifest_is_reported(tmp_path, gpt2):
    model, pairs = gpt2
    folder = tmp_path / "units"
    kwargs = dict(nodes=["head"], samples=4, batch_size=1, checkpoint=str(folder))
    atpstar.false_negative_bound(model, pairs, [("head", (0, 0, 0))], **kwargs)
    manifest = folder / "sweep.json"
    manifest.write_text(manifest.read_text()[:20])  # torn
    with pytest.raises(atpstar.InputError, match="unreadable sweep.json"):
        atpstar.false_negative_bound(model, pairs, [("head", (0, 0, 0))], **kwargs)


def test_edge_bound_as_ranges_of_samples_resumes_and_equals_one_range(tmp_path):
    """Edge subsampling is work units too: with a checkpoint, several ranges merged equal the single range."""
    model, pairs = load(build_hf("gpt2", n_layers=2, seed=3)), make_pairs(n_pairs=2, seq_len=5)
    kwargs = dict(nodes=["edge"], theta=0.05, samples=8, p=0.3, batch_size=2)
    expected = atpstar.false_negative_bound(model, pairs, [], **kwargs)
    pieces = atpstar.false_negative_bound(model, pairs, [], checkpoint=str(tmp_path / "e"), **kwargs)
    assert pieces.info["units"] == 8 and len(list((tmp_path / "e").glob("edge_samples*.safetensors"))) == 8
    assert pieces.max_effect_upper == pytest.approx(expected.max_effect_upper, rel=1e-12)
    assert pieces.worst_node == expected.worst_node
    assert pieces.cost.forward == pytest.approx(expected.cost.forward)  # whole batches: the same forwards
    again = atpstar.false_negative_bound(model, pairs, [], checkpoint=str(tmp_path / "e"), **kwargs)
    assert again.info["units_resumed"] == 8 and again.max_effect_upper == pieces.max_effect_upper


def test_patching_folder_resumes_with_another_memory_budget(gpt2, tmp_path):
    """``memory_gb`` only sizes the forwards: a folder resumes under another one, reusing its units (planned
    again on the folder's pair blocks when they fit), and the numbers are the same."""
    model, pairs = gpt2
    kwargs = dict(nodes=["head", "value"], checkpoint=str(tmp_path / "ck"))
    first = atpstar.attribute(model, pairs, "activation_patching", memory_gb=1e-4, **kwargs)  # pair blocks of 2
    assert first.info["pair_block"] == 2
    files = sorted((tmp_path / "ck").glob("patch_*.safetensors"))
    files[0].unlink()  # as if interrupted before the last unit
    again = atpstar.attribute(model, pairs, "activation_patching", memory_gb=1e-3, **kwargs)
    assert again.info["units_resumed"] == len(files) - 1 and again.info["units"] == len(files)
    assert sorted((tmp_path / "ck").glob("patch_*.safetensors")) == files  # the same layout, nothing mixed
    for t in first.per_pair:
        assert_rel_close(again.per_pair[t], first.per_pair[t], 1e-12, t)


def test_patching_folder_with_blocks_too_big_for_the_budget_is_refused(gpt2, tmp_path):
    model, pairs = gpt2
    kwargs = dict(nodes=["head", "value"], checkpoint=str(tmp_path / "ck"))
    atpstar.attribute(model, pairs, "activation_patching", memory_gb=1e-3, **kwargs)  # one block of 3 pairs
    with pytest.raises(atpstar.errors.IdentityMismatchError, match="Delete the folder") as err:
        atpstar.attribute(model, pairs, "activation_patching", memory_gb=1e-4, **kwargs)
    assert "--recompute" not in str(err.value)


@pytest.mark.parametrize("budget", [dict(memory_gb=1e-4), dict(batch_size=1)])
def test_verify_and_bound_folders_resume_with_another_batch(gpt2, tmp_path, budget):
    model, pairs = gpt2
    estimate = atpstar.attribute(model, pairs, "atp", nodes=["head"])
    first = atpstar.verify(model, pairs, estimate, budget=10, checkpoint=str(tmp_path / "v"))
    again = atpstar.verify(model, pairs, estimate, budget=10, checkpoint=str(tmp_path / "v"), **budget)
    assert again.info["units_resumed"] == again.info["units"] > 0
    assert torch.equal(again.effects, first.effects)
    kwargs = dict(nodes=["head"], samples=4, checkpoint=str(tmp_path / "b"))
    bound = atpstar.false_negative_bound(model, pairs, first, **kwargs)
    resumed = atpstar.false_negative_bound(model, pairs, first, **kwargs, **budget)
    assert resumed.info["units_resumed"] == resumed.info["units"] > 0
    assert resumed.max_effect_upper == bound.max_effect_upper
