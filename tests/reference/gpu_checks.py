"""CUDA-vs-CPU checks as plain functions, so they run with or without pytest (``tests/test_gpu.py`` wraps
them; ``python tests/reference/gpu_checks.py`` runs them all where pytest is not installed)."""

from __future__ import annotations

import copy
import sys
import traceback

import torch

import atpstar

from .models import build_hf, load, make_pairs

FAST_OPTIONS = {"subsampling": {"samples": 8}, "blocks": {"block_size": 3}}
ALL = ["neuron", "query", "key", "value", "head"]
FAMILIES = ("gpt2", "gpt_neox", "llama")
SPLIT_METHODS = ("atp", "atp*", "activation_patching", "subsampling")


def supported(method_id: str) -> list[str]:
    return [t for t in ALL if t in atpstar.METHODS[method_id].cls.node_types]


def close(got, want, rtol: float = 2e-4, atol: float = 2e-5) -> None:
    for t in want.per_pair:
        assert got.per_pair[t].device.type == "cpu", "results come back on the CPU"
        torch.testing.assert_close(got.per_pair[t].float(), want.per_pair[t], rtol=rtol, atol=atol, msg=t)


def cuda_matches_cpu_float32(family: str, method_id: str) -> None:
    hf = build_hf(family, n_layers=3, seed=51, dtype=torch.float32, exact_norm=False)
    pairs = make_pairs(n_pairs=3, seq_len=6, seed=52)
    options = FAST_OPTIONS.get(method_id, {})
    want = atpstar.attribute(load(hf), pairs, method=method_id, nodes=supported(method_id), **options)
    got = atpstar.attribute(
        load(copy.deepcopy(hf).cuda()), pairs, method=method_id, nodes=supported(method_id), **options
    )
    close(got, want)


def layers_split_between_gpu_and_cpu(method_id: str) -> None:
    import accelerate

    hf = build_hf("llama", n_layers=4, seed=53, dtype=torch.float32, exact_norm=False)
    pairs = make_pairs(n_pairs=2, seq_len=6, seed=54)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
                  "model.layers.2": 0, "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": 0}  # fmt: skip
    split = accelerate.dispatch_model(copy.deepcopy(hf), device_map=device_map)
    options = FAST_OPTIONS.get(method_id, {})
    nodes = ["neuron", "key", "head"]
    want = atpstar.attribute(load(hf), pairs, method=method_id, nodes=nodes, **options)
    got = atpstar.attribute(load(split), pairs, method=method_id, nodes=nodes, **options)
    close(got, want)


def bfloat16_on_gpu_is_close_to_float32_on_cpu() -> None:
    hf = build_hf("llama", n_layers=2, seed=55, dtype=torch.float32, saturated=False, exact_norm=False)
    pairs = make_pairs(n_pairs=4, seq_len=8, seed=56)
    nodes = ["neuron", "query", "key"]
    want = atpstar.attribute(load(hf), pairs, method="atp*", nodes=nodes)
    got = atpstar.attribute(load(copy.deepcopy(hf).to("cuda", torch.bfloat16)), pairs, method="atp*", nodes=nodes)
    for t in want.per_pair:
        assert got.per_pair[t].dtype == torch.float32
        assert (got.per_pair[t] - want.per_pair[t]).norm() / want.per_pair[t].norm() < 0.05, t


def memory_gb_bounds_cuda_peak() -> None:
    hf = build_hf("llama", n_layers=2, seed=57, dtype=torch.float32, exact_norm=False)
    model = load(copy.deepcopy(hf).cuda())
    pairs = make_pairs(n_pairs=16, seq_len=16, seed=58)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = atpstar.attribute(model, pairs, method="atp*", nodes=ALL, memory_gb=0.01)
    used_gb = (torch.cuda.max_memory_allocated() - before) / 2**30
    assert used_gb <= result.info["memory"]["working_gb"] * 1.1 + 0.01, (used_gb, result.info["memory"])


def all_checks() -> list[tuple[str, object]]:
    checks: list[tuple[str, object]] = []
    for family in FAMILIES:
        for method_id in sorted(atpstar.METHODS):
            checks.append(
                (f"cuda == cpu: {family} {method_id}", lambda f=family, m=method_id: cuda_matches_cpu_float32(f, m))
            )
    for method_id in SPLIT_METHODS:
        checks.append((f"gpu/cpu split: {method_id}", lambda m=method_id: layers_split_between_gpu_and_cpu(m)))
    checks.append(("bfloat16 on gpu", bfloat16_on_gpu_is_close_to_float32_on_cpu))
    checks.append(("memory_gb bounds cuda peak", memory_gb_bounds_cuda_peak))
    return checks


def main() -> int:
    failed = 0
    for name, check in all_checks():
        try:
            check()  # type: ignore[operator]
            print(f"PASS {name}")
        except Exception:
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc(limit=3)}")
    print(f"{len(all_checks()) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
