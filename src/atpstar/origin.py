"""Where a model was loaded from, so that another process (a Ray worker) can load the same weights.

``load_model`` sets ``Model.origin`` for a built-in name, a folder or a hub id; a model handed over as
an object has no origin (``None``) and must be shipped. ``weights`` fingerprints the tensors at load
time: a model whose weights were replaced or modified in place since is no longer what its origin
loads (``distributed.source`` then ships the weights instead).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def weights_signature(hf_model: torch.nn.Module) -> tuple[Any, ...]:
    """Changes whenever a parameter or buffer is replaced or modified in place (tensor version counters)."""
    tensors = list(hf_model.parameters()) + list(hf_model.buffers())
    return (id(hf_model), tuple((t.data_ptr(), t._version, t.dtype) for t in tensors))


@dataclass(frozen=True)
class Origin:
    """What ``load_model`` was given, enough to load the same model again.

    Example:
        >>> atpstar.load_model("toy-ioi").origin
        Origin(kind='builtin', name='toy-ioi', dtype='float32', device=None)
    """

    kind: str  # "builtin" (atpstar.zoo name), "folder" (absolute path) or "hub" (Hugging Face hub id)
    name: str  # what to pass to load_model: the built-in name, the absolute folder, or the hub id
    dtype: str  # parameter dtype it was loaded in, e.g. "float32"
    device: str | None = None  # device it was moved to at load (None: where from_pretrained put it)
    weights: tuple[Any, ...] = field(default=(), compare=False, repr=False)  # weights_signature right after loading
