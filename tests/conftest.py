"""Shared fixtures: tiny random float64 models of the three families (some heads saturated) and pairs.

The builders live in ``reference/models.py`` (importable as ``reference.models``; importing
``conftest`` by name is ambiguous once sub-folders have their own conftest).
"""

from __future__ import annotations

import pytest
import torch

import atpstar
from reference.models import (  # noqa: F401  (re-exported for tests that import them from here)
    FAMILIES,
    N_CTX,
    VOCAB,
    assert_rel_close,
    assert_unchanged,
    build_hf,
    load,
    make_pairs,
    snapshot,
)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def hf_models() -> dict[str, torch.nn.Module]:
    """One float64 model per family, built once; tests must not modify them (they are checked)."""
    return {f: build_hf(f) for f in FAMILIES}


@pytest.fixture
def hf_model(hf_models, family):
    return hf_models[family]


@pytest.fixture
def model(hf_model) -> atpstar.Model:
    return load(hf_model)


@pytest.fixture
def pairs() -> atpstar.PromptPairs:
    return make_pairs()


def pytest_collection_modifyitems(config, items) -> None:
    """``gpu`` tests need CUDA: skip them, with the reason, on machines without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA GPU (torch.cuda.is_available() is False); run benchmarks/gpu.sh on one"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
