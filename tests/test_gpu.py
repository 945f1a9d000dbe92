"""CUDA results equal CPU float32 results (``-m gpu``; skipped without a GPU, see conftest).

Every method on small random models of the three families; a model split between the GPU and the CPU
with ``device_map``; a bfloat16 model on the GPU against float32 on the CPU (loosely: bf16 passes); the
CUDA peak of a run against its ``memory_gb`` plan. The checks live in ``reference/gpu_checks.py`` so
``benchmarks/gpu.sh`` can run them where pytest is not installed.
"""

from __future__ import annotations

import pytest

import atpstar
from reference import gpu_checks

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", gpu_checks.FAMILIES)
@pytest.mark.parametrize("method_id", sorted(atpstar.METHODS))
def test_cuda_matches_cpu_float32(family, method_id):
    gpu_checks.cuda_matches_cpu_float32(family, method_id)


@pytest.mark.parametrize("method_id", gpu_checks.SPLIT_METHODS)
def test_layers_split_between_gpu_and_cpu(method_id):
    pytest.importorskip("accelerate", reason="device_map dispatch needs accelerate")
    gpu_checks.layers_split_between_gpu_and_cpu(method_id)


def test_bfloat16_on_gpu_is_close_to_float32_on_cpu():
    gpu_checks.bfloat16_on_gpu_is_close_to_float32_on_cpu()


def test_memory_gb_bounds_cuda_peak():
    gpu_checks.memory_gb_bounds_cuda_peak()
