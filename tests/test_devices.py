"""Models dispatched with accelerate (layers offloaded to CPU and disk) give the plain model's results.

Each layer's activations and patches live on that layer's execution device; weights of offloaded
layers sit on the ``meta`` device between calls and are loaded by accelerate's hooks.
"""

from __future__ import annotations

import copy

import pytest
import torch

import atpstar
from atpstar.devices import execution_device
from reference.models import build_hf, load, make_pairs

accelerate = pytest.importorskip("accelerate", reason="accelerate is the device_map engine (extra 'models'/'dev')")

ALL = ["neuron", "query", "key", "value", "head"]
FAST_OPTIONS = {"subsampling": {"samples": 8}, "blocks": {"block_size": 3}}


def offloaded(hf_model, tmp_path, family: str):
    """A copy with layer 1 and the unembedding on disk, everything else on the CPU (weights on meta)."""
    prefix = {"gpt2": "transformer", "gpt_neox": "gpt_neox", "llama": "model"}[family]
    layers = {"gpt2": "h", "gpt_neox": "layers", "llama": "layers"}[family]
    copy_ = copy.deepcopy(hf_model)
    head = next(name for name, m in copy_.named_modules() if m is copy_.get_output_embeddings())
    base = dict(copy_.named_children())[prefix]
    device_map = {f"{prefix}.{name}": "cpu" for name, _ in base.named_children() if name != layers}
    n_layers = copy_.config.num_hidden_layers
    device_map.update({f"{prefix}.{layers}.{i}": ("disk" if i == 1 else "cpu") for i in range(n_layers)})
    device_map[head] = "disk"
    return accelerate.dispatch_model(copy_, device_map=device_map, offload_dir=str(tmp_path))


def supported(method_id):
    return [t for t in ALL if t in atpstar.METHODS[method_id].cls.node_types]


@pytest.fixture(scope="module")
def plain_and_offloaded(tmp_path_factory):
    hf = build_hf("llama", n_layers=3, seed=3)
    return load(hf), load(offloaded(hf, tmp_path_factory.mktemp("offload"), "llama"))


def test_offloaded_weights_really_are_off_device(plain_and_offloaded):
    _, model = plain_and_offloaded
    devices = {p.device.type for p in model.hf_model.parameters()}
    assert devices == {"cpu", "meta"}
    assert model.device == torch.device("cpu") and model.layer_device(1) == torch.device("cpu")


@pytest.mark.parametrize("method_id", sorted(atpstar.METHODS))
def test_every_method_matches_the_plain_model(method_id, plain_and_offloaded):
    plain, model = plain_and_offloaded
    pairs = make_pairs(n_pairs=2, seq_len=5, seed=4)
    options = FAST_OPTIONS.get(method_id, {})
    want = atpstar.attribute(plain, pairs, method=method_id, nodes=supported(method_id), **options)
    got = atpstar.attribute(model, pairs, method=method_id, nodes=supported(method_id), **options)
    for t in want.per_pair:
        torch.testing.assert_close(got.per_pair[t], want.per_pair[t], rtol=1e-10, atol=1e-12, msg=t)
    assert got.cost.forward_equivalents == want.cost.forward_equivalents


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_other_families_offloaded(family, tmp_path):
    hf = build_hf(family, n_layers=3, seed=5)
    pairs = make_pairs(n_pairs=2, seq_len=5, seed=6)
    model = load(offloaded(hf, tmp_path, family))
    for method_id in ("atp*", "activation_patching"):
        want = atpstar.attribute(load(hf), pairs, method=method_id, nodes=["neuron", "key"])
        got = atpstar.attribute(model, pairs, method=method_id, nodes=["neuron", "key"])
        for t in want.per_pair:
            torch.testing.assert_close(got.per_pair[t], want.per_pair[t], rtol=1e-10, atol=1e-12)


def test_cpu_offload_of_the_whole_model():
    """accelerate.cpu_offload: every weight on meta, streamed to the execution device per call."""
    hf = build_hf("gpt_neox", n_layers=2, seed=7)
    pairs = make_pairs(n_pairs=2, seq_len=4, seed=8)
    want = atpstar.attribute(load(hf), pairs, method="atp*", nodes=["query", "value"])
    streamed = accelerate.cpu_offload(copy.deepcopy(hf), execution_device=torch.device("cpu"))
    got = atpstar.attribute(load(streamed), pairs, method="atp*", nodes=["query", "value"])
    for t in want.per_pair:
        torch.testing.assert_close(got.per_pair[t], want.per_pair[t], rtol=1e-10, atol=1e-12)


def test_execution_device_of_plain_and_hooked_modules():
    linear = torch.nn.Linear(2, 2)
    assert execution_device(linear) == torch.device("cpu")
    hooked = accelerate.cpu_offload(torch.nn.Sequential(torch.nn.Linear(2, 2)), execution_device=torch.device("cpu"))
    assert next(hooked.parameters()).device.type == "meta"
    assert execution_device(hooked[0]) == torch.device("cpu")
