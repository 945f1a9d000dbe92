"""CUDA results equal CPU float32 results (``-m gpu``; skipped without a GPU, see conftest).

Every method on small random models of the three families; a model split between the GPU and the CPU
with ``device_map``; a bfloat16 model on the GPU against float32 on the CPU (loosely: bf16 passes).
"""

from __future__ import annotations

import copy

import pytest
import torch
from reference.models import build_hf, load, make_pairs

import atpstar

pytestmark = pytest.mark.gpu
FAST_OPTIONS = {"subsampling": {"samples": 8}, "blocks": {"block_size": 3}}
ALL = ["neuron", "query", "key", "value", "head"]


def supported(method_id):
    return [t for t in ALL if t in atpstar.METHODS[method_id].cls.node_types]


def close(got, want, rtol=2e-4, atol=2e-5):
    for t in want.per_pair:
        assert got.per_pair[t].device.type == "cpu", "results come back on the CPU"
        torch.testing.assert_close(got.per_pair[t].float(), want.per_pair[t], rtol=rtol, atol=atol, msg=t)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
@pytest.mark.parametrize("method_id", sorted(atpstar.METHODS))
def test_cuda_matches_cpu_float32(family, method_id):
    hf = build_hf(family, n_layers=3, seed=51, dtype=torch.float32, exact_norm=False)
    pairs = make_pairs(n_pairs=3, seq_len=6, seed=52)
    options = FAST_OPTIONS.get(method_id, {})
    want = atpstar.attribute(load(hf), pairs, method=method_id, nodes=supported(method_id), **options)
    got = atpstar.attribute(
        load(copy.deepcopy(hf).cuda()), pairs, method=method_id, nodes=supported(method_id), **options
    )
    close(got, want)


@pytest.mark.parametrize("method_id", ["atp", "atp*", "activation_patching", "subsampling"])
def test_layers_split_between_gpu_and_cpu(method_id):
    accelerate = pytest.importorskip("accelerate")
    hf = build_hf("llama", n_layers=4, seed=53, dtype=torch.float32, exact_norm=False)
    pairs = make_pairs(n_pairs=2, seq_len=6, seed=54)
    device_map = {
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.layers.0": 0,
        "model.layers.1": "cpu",
        "model.layers.2": 0,
        "model.layers.3": "cpu",
        "model.norm": "cpu",
        "lm_head": 0,
    }
    split = accelerate.dispatch_model(copy.deepcopy(hf), device_map=device_map)
    options = FAST_OPTIONS.get(method_id, {})
    want = atpstar.attribute(load(hf), pairs, method=method_id, nodes=["neuron", "key", "head"], **options)
    got = atpstar.attribute(load(split), pairs, method=method_id, nodes=["neuron", "key", "head"], **options)
    close(got, want)


def test_bfloat16_on_gpu_is_close_to_float32_on_cpu():
    hf = build_hf("llama", n_layers=2, seed=55, dtype=torch.float32, saturated=False, exact_norm=False)
    pairs = make_pairs(n_pairs=4, seq_len=8, seed=56)
    want = atpstar.attribute(load(hf), pairs, method="atp*", nodes=["neuron", "query", "key"])
    got = atpstar.attribute(
        load(copy.deepcopy(hf).to("cuda", torch.bfloat16)), pairs, method="atp*", nodes=["neuron", "query", "key"]
    )
    for t in want.per_pair:
        assert got.per_pair[t].dtype == torch.float32
        assert (got.per_pair[t] - want.per_pair[t]).norm() / want.per_pair[t].norm() < 0.05, t


def test_memory_gb_bounds_cuda_peak():
    hf = build_hf("llama", n_layers=2, seed=57, dtype=torch.float32, exact_norm=False)
    model = load(copy.deepcopy(hf).cuda())
    pairs = make_pairs(n_pairs=16, seq_len=16, seed=58)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = atpstar.attribute(model, pairs, method="atp*", nodes=ALL, memory_gb=0.01)
    used_gb = (torch.cuda.max_memory_allocated() - before) / 2**30
    assert used_gb <= result.info["memory"]["working_gb"] * 1.1 + 0.01, (used_gb, result.info["memory"])
