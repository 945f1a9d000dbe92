"""``load_model``: a transformers object, a local folder, a hub id, or a built-in name -> ``Model``."""

from __future__ import annotations

import os
from typing import Any

import torch

from .errors import InputError
from .model import Model


def load_model(
    model: Any,
    tokenizer: Any = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
) -> Model:
    """Wrap a causal LM for attribution.

    Args:
        model: a loaded ``transformers`` causal LM (kept as is: dtype, device, ``device_map``), a local
            folder, a Hugging Face hub id (e.g. ``"EleutherAI/pythia-70m"``), or a built-in name
            (``atpstar.zoo.BUILTIN_MODELS``, e.g. ``"smollm2-135m"``, ``"toy-ioi"``).
        tokenizer: its tokenizer; loaded alongside when ``model`` is a name or folder.
        dtype: for names and folders, the dtype to load in (default float32).
        device: for names and folders, where to put the model (default cpu).

    Returns:
        A ``Model`` in eval mode (switched with a warning if it was training).

    Raises:
        UnsupportedModelError: the family or an attention feature is not implemented.
    """
    if isinstance(model, Model):
        return model
    if isinstance(model, torch.nn.Module):
        return Model(model, tokenizer)
    if not isinstance(model, (str, os.PathLike)):
        raise InputError(
            f"model must be a transformers model, a folder, a hub id or a built-in name; got {type(model).__name__}"
        )
    name = str(model)
    torch_dtype = _dtype(dtype)
    from . import zoo

    if name in zoo.BUILTIN_MODELS:
        hf_model, loaded_tokenizer = zoo.load_builtin(name, dtype=torch_dtype)
    else:
        hf_model, loaded_tokenizer = _from_pretrained(name, torch_dtype)
    if device is not None:
        hf_model = hf_model.to(device)
    wrapped = Model(hf_model, tokenizer if tokenizer is not None else loaded_tokenizer, model_id=name)
    from .distributed.source import record_loaded

    record_loaded(wrapped, name, torch_dtype)  # Ray workers load the same name instead of receiving weights
    return wrapped


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise InputError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'float64', 'bfloat16'")
    return getattr(torch, dtype)


def _from_pretrained(name: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """Folder or hub id through ``from_pretrained`` (the hub needs network access)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as err:
        raise InputError(
            f"could not load model {name!r}: not a built-in name, not a folder with config.json, and the hub "
            f"could not provide it ({err.__class__.__name__}). Built-in names: see atpstar.zoo.BUILTIN_MODELS"
        ) from err
    from .families import family_of

    family_of(config)  # check the family before downloading weights
    hf_model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError):
        tokenizer = None
    return hf_model.eval(), tokenizer
