"""The command line over a table of bad inputs: each ends in ``error: ...`` and exit code 2, never a traceback.

Also: results of another model or prompt set are refused naming what differs, ``--recompute``
discards them, a locked output folder is refused, and the interrupt message tells the truth.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import atpstar
from atpstar.cli import main
from atpstar.lock import folder_lock
from test_cli import make_tiny, write_pairs


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    model = make_tiny(root / "model")
    other = root / "other"  # same tokenizer and config, other weights
    shutil.copytree(model, other)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(other / "model.safetensors"))
    weights = {k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    pairs = write_pairs(root / "pairs.jsonl")
    common = ["--model", str(model), "--task", str(pairs), "--no-progress", "--no-plots"]
    assert main(["run", *common, "--method", "atp", "--nodes", "head", "--verify", "3", "--out", str(root / "a")]) == 0
    (root / "empty").mkdir()
    (root / "noweights").mkdir()
    shutil.copy(model / "config.json", root / "noweights" / "config.json")
    (root / "latin1.jsonl").write_bytes(
        (json.dumps({"clean": "When Mary", "noise": "When Tom", "answer": " Mary"}) + "\n").encode()
        + b'{"clean": "When Mar\xe9", "noise": "When Tom", "answer": " Mary"}\n'
    )
    write_pairs(root / "unknown.jsonl", [json.dumps({"clean": "When Zelda and John went to the store, John gave a drink to",
                                                     "noise": "When Tom and Anna went to the store, Tom gave a drink to",
                                                     "answer": " Mary", "distractor": " John"})])
    write_pairs(root / "same.jsonl", [json.dumps({"clean": "When Mary and John went", "noise": "When Mary and John went",
                                                  "answer": " Mary", "distractor": " John"})])
    (root / "one.jsonl").write_text(pairs.read_text().splitlines()[0] + "\n")
    for name in ("estimate", "verified"):
        for suffix in (".json", ".safetensors"):
            shutil.copy(root / "a" / f"{name}{suffix}", root / f"trunc_{name}{suffix}")
        data = (root / f"trunc_{name}.safetensors").read_bytes()
        (root / f"trunc_{name}.safetensors").write_bytes(data[: len(data) // 2])
    (root / "afile").write_text("x")
    return {"root": root, "model": model, "other": other, "pairs": pairs}


# (case, arguments with {model}, {other}, {pairs}, {root} placeholders, text the error must contain)
BAD = [
    ("cuda without a GPU", "run --model {model} --task {pairs} --device cuda", "no CUDA GPU"),
    ("unknown device", "run --model {model} --task {pairs} --device bogus", "not a torch device"),
    ("integer dtype", "run --model {model} --task {pairs} --dtype int64", "floating-point dtype"),
    ("negative threads", "run --model {model} --task {pairs} --threads -2", "--threads must be an integer >= 1"),
    ("zero threads", "run --model {model} --task {pairs} --threads 0", "--threads"),
    ("NaN memory", "run --model {model} --task {pairs} --method activation_patching --option memory_gb=NaN", "finite"),
    ("NaN hierarchical threshold", "compare --model {model} --task {pairs} --methods hierarchical "
     "--option hierarchical:threshold=NaN", "finite"),
    ("infinite option", "run --model {model} --task {pairs} --method subsampling --option p=Infinity", "finite"),
    ("NaN verify threshold", "verify --model {model} --task {pairs} --estimate {root}/a/estimate --threshold nan",
     "--threshold must be a finite"),
    ("NaN theta", "bound --model {model} --task {pairs} --verified {root}/a/verified --theta nan", "--theta"),
    ("p out of range", "bound --model {model} --task {pairs} --verified {root}/a/verified --theta 1 --p 1.5", "--p"),
    ("alpha zero", "bound --model {model} --task {pairs} --verified {root}/a/verified --theta 1 --alpha 0", "--alpha"),
    ("negative top", "run --model {model} --task {pairs} --top -5", "--top"),
    ("negative verify", "run --model {model} --task {pairs} --verify -3", "--verify"),
    ("negative budget", "verify --model {model} --task {pairs} --estimate {root}/a/estimate --budget -1", "--budget"),
    ("zero pairs", "run --model {model} --task ioi --n-pairs 0", "--n-pairs"),
    ("a billion pairs", "run --model {model} --task random --n-pairs 1000000000", "more than"),
    ("k-max zero", "compare --model {model} --task {pairs} --methods atp --k-max 0", "--k-max"),
    ("k-max beyond the nodes", "compare --model {model} --task {pairs} --methods atp --nodes head --k-max 100000",
     "--k-max 100000 is more than"),
    ("not UTF-8", "run --model {model} --task {root}/latin1.jsonl", "latin1.jsonl:2: not UTF-8"),
    ("unknown word", "run --model {model} --task {root}/unknown.jsonl", "outside the tokenizer's vocabulary"),
    ("empty model folder", "run --model {root}/empty --task {pairs}", "no config.json"),
    ("config without weights", "run --model {root}/noweights --task {pairs}", "no weights"),
    ("missing folder", "run --model ./no/such/folder --task {pairs}", "does not exist"),
    ("seq-len beyond positions", "run --model {model} --task random --seq-len 1000", "at most 32 positions"),
    ("truncated estimate", "verify --model {model} --task {pairs} --estimate {root}/trunc_estimate", "does not match"),
    ("truncated verification", "bound --model {model} --task {pairs} --verified {root}/trunc_verified --theta 1",
     "does not match"),
    ("verification as estimate", "verify --model {model} --task {pairs} --estimate {root}/a/verified",
     "not a saved attribution"),
    ("estimate as verification", "bound --model {model} --task {pairs} --verified {root}/a/estimate --theta 1",
     "not a saved verification"),
    ("estimate of another model", "verify --model {other} --task {pairs} --estimate {root}/a/estimate",
     "model weights (saved"),
    ("verification of another model", "bound --model {other} --task {pairs} --verified {root}/a/verified --theta 1",
     "model weights (saved"),
    ("estimate of another direction", "verify --model {model} --task {pairs} --estimate {root}/a/estimate "
     "--direction denoising", "direction (saved 'noising', now 'denoising')"),
    ("estimate of other pairs", "verify --model {model} --task {root}/one.jsonl --estimate {root}/a/estimate",
     "prompt pairs (tokens) (saved"),
    ("out is under a file", "run --model {model} --task {pairs} --out {root}/afile/out", "not writable"),
    ("unreachable hub", "run --model someone/some-model --task {pairs}", "cannot reach the Hugging Face hub"),
    ("option without value", "run --model {model} --task {pairs} --option samples", "KEY=VALUE"),
    ("NaN fractions", "circuit --model {model} --task {pairs} --method atp --fractions nan",
     "--fractions must be increasing finite values in [0, 1]"),
    ("infinite fractions", "circuit --model {model} --task {pairs} --method atp --fractions 0.1,inf", "got [0.1, inf]"),
    ("fraction above 1", "circuit --model {model} --task {pairs} --method atp --fractions 0.5,1e400", "--fractions"),
    ("known first word not listed as unknown", "run --model {model} --task {root}/unknown.jsonl",
     "(unknown: ['Zelda'])"),
]


@pytest.mark.parametrize("case,command,expected", BAD, ids=[case for case, _, _ in BAD])
def test_bad_input_exits_2_with_a_clear_error(setup, tmp_path, capsys, monkeypatch, case, command, expected) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port: the hub is unreachable here
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    argv = command.format(**{k: str(v) for k, v in setup.items()}).split()
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    code = main([*argv, "--no-progress", "--no-plots"])  # an uncaught exception fails the test: no traceback
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("error: ") == 1 and expected in err, err


def test_identical_clean_and_noise_is_an_error(setup, tmp_path, capsys) -> None:
    code = main(["run", "--model", str(setup["model"]), "--task", str(setup["root"] / "same.jsonl"),
                 "--out", str(tmp_path), "--no-progress", "--no-plots"])
    err = capsys.readouterr().err
    assert code == 2 and "identical" in err, err


def test_compare_refuses_another_models_results_and_recompute_discards(setup, tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    base = ["compare", "--task", str(setup["pairs"]), "--methods", "atp", "--nodes", "head", "--out", str(out),
            "--no-progress", "--no-plots", "--setting", "distribution"]
    assert main([*base, "--model", str(setup["model"])]) == 0
    capsys.readouterr()
    assert main([*base, "--model", str(setup["other"])]) == 2
    err = capsys.readouterr().err
    assert "ground_truth.json" in err and "model weights (saved" in err and "--recompute" in err
    assert main([*base, "--model", str(setup["model"]), "--dtype", "float64"]) == 2
    assert "dtype (saved 'float32', now 'float64')" in capsys.readouterr().err
    assert main([*base, "--model", str(setup["other"]), "--recompute"]) == 0
    from atpstar import Attribution

    truth = Attribution.load(out / "ground_truth")
    assert truth.identity is not None and truth.model_id == str(setup["other"])
    assert "discarding" in capsys.readouterr().err
    # a corrupt cached result is reported and recomputed, not fatal
    (out / "estimates" / "atp.json").write_text("{trunc")
    assert main([*base, "--model", str(setup["other"])]) == 0
    assert "not valid JSON" in capsys.readouterr().err


def test_locked_output_folder_is_refused(setup, tmp_path, capsys) -> None:
    out = tmp_path / "locked"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from atpstar.lock import folder_lock\n"
                               f"with folder_lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        code = main(["run", "--model", str(setup["model"]), "--task", str(setup["pairs"]), "--out", str(out),
                     "--no-progress", "--no-plots"])
        err = capsys.readouterr().err
        assert code == 2 and f"in use by atpstar pid {holder.pid}" in err, err
    finally:
        holder.kill()
        holder.wait()
    with folder_lock(out):
        pass


def test_interrupt_message_is_true(setup, tmp_path, capsys, monkeypatch) -> None:
    import atpstar.engine as engine_module

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_module, "patch_node_batch", interrupt)
    common = ["--model", str(setup["model"]), "--task", str(setup["pairs"]), "--no-progress", "--no-plots",
              "--nodes", "head"]
    assert main(["run", *common, "--method", "activation_patching", "--out", str(tmp_path / "ap")]) == 130
    err = capsys.readouterr().err
    assert "estimate.units" in err and (tmp_path / "ap" / "estimate.units").is_dir()
    from atpstar.methods.atp import AttributionPatching

    monkeypatch.setattr(AttributionPatching, "_attribute", lambda *a, **k: interrupt())
    assert main(["run", *common, "--method", "atp", "--out", str(tmp_path / "atp")]) == 130
    assert "nothing was saved" in capsys.readouterr().err


def test_no_traceback_in_a_real_process(setup, tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "atpstar.cli", "run", "--model", str(setup["model"]), "--task",
                           str(setup["pairs"]), "--threads", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.startswith("error: ")


def test_api_errors(setup) -> None:
    import atpstar

    model = atpstar.load_model(str(setup["model"]))
    with pytest.raises(atpstar.InputError, match="rectangular"):
        atpstar.PromptPairs([[1, 2, 3], [1, 2]], [[1, 2, 3], [1, 2]], [1, 2], [2, 1])
    pairs = atpstar.PromptPairs([[2, 3, 4]], [[2, 5, 4]], [10_000], [3])
    with pytest.raises(atpstar.InputError, match=r"answer token ids must lie in \[0, 18\)"):
        atpstar.attribute(model, pairs, "atp", ["head"])

    def argmax_metric(logits, answer, distractor):
        return (logits.argmax(-1) == answer).float()

    detached = atpstar.PromptPairs([[2, 3, 4]], [[2, 5, 4]], [3], [4], metric=argmax_metric)
    with pytest.raises(atpstar.InputError, match="no gradient"):
        atpstar.attribute(model, detached, "atp", ["head"])

    def nan_metric(logits, answer, distractor):
        return logits[:, 0] * float("nan")

    with pytest.raises(atpstar.InputError, match="not finite"):
        atpstar.attribute(model, atpstar.PromptPairs([[2, 3, 4]], [[2, 5, 4]], [3], [4], metric=nan_metric),
                          "activation_patching", ["head"])
    with pytest.raises(atpstar.InputError, match="finite"):
        atpstar.attribute(model, atpstar.PromptPairs([[2, 3, 4]], [[2, 5, 4]], [3], [4]), "hierarchical", ["head"],
                          threshold=float("nan"))
    with pytest.raises(atpstar.InputError, match="not a torch device"):
        atpstar.load_model(str(setup["model"]), device="bogus")
    with pytest.raises(atpstar.InputError, match="floating-point"):
        atpstar.load_model(str(setup["model"]), dtype=torch.int64)


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the options were all checked")


@pytest.mark.parametrize("command", ["run", "compare", "circuit"])
def test_plots_without_matplotlib_are_refused_before_the_model_loads(setup, tmp_path, capsys, monkeypatch, command):
    import atpstar.cli.circuit
    import atpstar.cli.commands

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(atpstar.cli.commands, "load_model", _no_model)
    monkeypatch.setattr(atpstar.cli.circuit, "load_model", _no_model)
    methods = {"run": ["--method", "atp"], "compare": ["--methods", "atp"], "circuit": ["--method", "atp"]}[command]
    code = main([command, "--model", str(setup["model"]), "--task", str(setup["pairs"]), *methods,
                 "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "pip install matplotlib" in err and "--no-plots" in err, err
    assert not list((tmp_path / "out").glob("*.json"))


def test_a_command_without_plots_runs_without_matplotlib(setup, tmp_path, capsys, monkeypatch) -> None:
    import atpstar.cli.find_command

    def reached(*args, **kwargs):
        raise atpstar.InputError("the model is loading")

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(atpstar.cli.find_command, "load_model", reached)
    code = main(["find", "--model", str(setup["model"]), "--task", str(setup["pairs"]), "--theta", "0.5",
                 "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2 and "the model is loading" in capsys.readouterr().err


@pytest.mark.parametrize("command,methods,nodes", [
    ("compare", "atp,subsampling", "edge"),
    ("compare", "atp,hierarchical", "edge"),
    ("run", "subsampling", "edge"),
    ("circuit", "atp,subsampling", None),
])
def test_a_method_without_the_node_space_is_refused_before_the_first_pass(setup, tmp_path, capsys, monkeypatch,
                                                                        command, methods, nodes):
    import atpstar.cli.circuit
    import atpstar.cli.commands

    monkeypatch.setattr(atpstar.cli.commands, "load_model", _no_model)
    monkeypatch.setattr(atpstar.cli.circuit, "load_model", _no_model)
    flag = "--methods" if command == "compare" else "--method"
    argv = [command, "--model", str(setup["model"]), "--task", str(setup["pairs"]), flag, methods,
            "--out", str(tmp_path / "out"), "--no-progress", "--no-plots"]
    code = main(argv + (["--nodes", nodes] if nodes else []))
    err = capsys.readouterr().err
    assert code == 2 and "does not support node types ['edge'] (it has no edge form)" in err, err
    assert not (tmp_path / "out" / "ground_truth.json").exists()


@pytest.fixture(scope="module")
def loaded(setup):
    model = atpstar.load_model(str(setup["model"]))
    return model, atpstar.read_pairs_jsonl(str(setup["pairs"]), model.tokenizer)


def test_faithfulness_curve_takes_a_loaded_mib_circuit(loaded, tmp_path) -> None:
    from atpstar.edges.graph import EdgeGraph
    from atpstar.edges.mib import save_mib

    model, pairs = loaded
    estimate = atpstar.attribute(model, pairs, "atp", ["edge"])
    estimate.to_mib(tmp_path / "c.json")
    fractions = [0.1, 0.5, 1.0]
    from_file = atpstar.faithfulness_curve(model, pairs, atpstar.load_mib(tmp_path / "c.json"), fractions)
    direct = atpstar.faithfulness_curve(model, pairs, estimate, fractions)
    assert from_file.faithfulness == direct.faithfulness and from_file.cpr == direct.cpr
    other = EdgeGraph(1, 4, True)
    save_mib(tmp_path / "other.json", other, 32, torch.ones(other.n_edges))
    with pytest.raises(atpstar.InputError, match="the MIB circuit is for 1 layers x 4 heads"):
        atpstar.faithfulness_curve(model, pairs, atpstar.load_mib(tmp_path / "other.json"), fractions)
    with pytest.raises(atpstar.InputError, match="finite values in"):
        atpstar.faithfulness_curve(model, pairs, estimate, [float("nan")])


def test_find_takes_a_keep_top_estimate(loaded) -> None:
    model, pairs = loaded
    dense = atpstar.attribute(model, pairs, "atp*", ["head"])
    top = atpstar.attribute(model, pairs, "atp*", ["head"], keep="top", top_k=3)
    truth = atpstar.attribute(model, pairs, "activation_patching", ["head"])
    theta = float(truth.scores["head"].abs().max()) / 3
    with_dense = atpstar.find(model, pairs, theta, nodes=["head"], estimator=dense)
    with_top = atpstar.find(model, pairs, theta, nodes=["head"], estimator=top)
    assert with_top.certified and with_dense.certified and with_top.names
    assert sorted(with_top.names) == sorted(with_dense.names)


def test_weights_on_the_meta_device_are_refused(loaded) -> None:
    from transformers import AutoModelForCausalLM

    model, pairs = loaded
    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(model.hf_model.config).eval()
    empty_model = atpstar.Model(empty, tokenizer=model.tokenizer)
    estimate = atpstar.attribute(model, pairs, "atp", ["edge"])
    verified = atpstar.verify(model, pairs, estimate, budget=3)
    for call in (
        lambda: atpstar.attribute(empty_model, pairs, "atp", ["head"]),
        lambda: atpstar.verify(empty_model, pairs, estimate, budget=3),
        lambda: atpstar.find(empty_model, pairs, 0.1, nodes=["head"]),
        lambda: atpstar.faithfulness_curve(empty_model, pairs, estimate, [0.5, 1.0]),
        lambda: atpstar.false_negative_bound(empty_model, pairs, verified),
    ):
        with pytest.raises(atpstar.InputError, match="on the meta device .* device_map"):
            call()


def test_writers_name_the_folder_they_cannot_create_never_a_temporary_file(loaded, tmp_path) -> None:
    model, pairs = loaded
    estimate = atpstar.attribute(model, pairs, "atp", ["edge"])
    for name in ("c.json", "c.pt"):  # a missing folder is created, as every writer does
        assert estimate.to_mib(tmp_path / "missing_dir" / name).is_file()
    (tmp_path / "afile").write_text("x")
    for name in ("c.json", "c.pt"):
        with pytest.raises(atpstar.InputError, match="its folder .*afile.* cannot be created") as caught:
            estimate.to_mib(tmp_path / "afile" / name)
        assert ".tmp" not in str(caught.value)
