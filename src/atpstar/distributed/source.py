"""How a worker gets the model: by name, or from the driver's weights in Ray's object store.

- A model from ``load_model(name)`` (built-in name, folder or hub id) whose weights are unchanged since
  loading is loaded by every worker from that name (nothing large crosses the network).
- Any other model is shipped: its config and ``state_dict`` when ``from_config`` rebuilds the same
  module tree, else the pickled module itself (custom modules swapped in by the user). The weights
  are put into the object store once and referenced, so every worker reads the same copy.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from ..model import Model

# Models loaded by name: Model -> (name, dtype, weights signature at load time).
_LOADED_FROM: weakref.WeakKeyDictionary[Model, tuple[str, str, tuple[Any, ...]]] = weakref.WeakKeyDictionary()


def weights_signature(hf_model: torch.nn.Module) -> tuple[Any, ...]:
    """Changes whenever a parameter or buffer is replaced or modified in place (tensor version counters)."""
    tensors = list(hf_model.parameters()) + list(hf_model.buffers())
    return (id(hf_model), tuple((t.data_ptr(), t._version, t.dtype) for t in tensors))


def record_loaded(model: Model, name: str, dtype: torch.dtype) -> None:
    """Remember that ``model`` came from ``name`` in ``dtype`` (called by ``load_model``)."""
    if os.path.isdir(name):  # workers may run elsewhere in the file system tree
        name = os.path.abspath(name)
    _LOADED_FROM[model] = (name, str(dtype).removeprefix("torch."), weights_signature(model.hf_model))


@dataclass
class ModelSource:
    """What a worker needs to build the model (small: large parts are object references).

    Attributes:
        key: identifies the weights; a worker that already holds them skips loading.
        model_id: the driver model's id (results name it).
        name, dtype: load with ``load_model(name, dtype=dtype)``.
        config, weights: rebuild with ``from_config(config)`` and load ``weights`` (object reference of a
            ``state_dict``; kept inside this object so Ray hands the worker the reference, not a copy).
        module: object reference of the pickled ``transformers`` module.
    """

    key: str
    model_id: str
    name: str | None = None
    dtype: str | None = None
    config: Any = None
    weights: Any = None
    module: Any = None

    def load(self, device: str) -> Model:
        import ray

        from ..loading import load_model

        if self.name is not None:
            model = load_model(self.name, dtype=self.dtype, device=device)
            model.model_id = self.model_id
            return model
        if self.module is not None:
            hf_model = ray.get(self.module)
        else:
            from transformers import AutoModelForCausalLM

            hf_model = AutoModelForCausalLM.from_config(self.config)
            state = ray.get(self.weights)
            hf_model.to(next(iter(state.values())).dtype)
            hf_model.load_state_dict(state, strict=True)
        return Model(hf_model.to(device).eval(), model_id=self.model_id)


_SHIPPED: dict[tuple[Any, ...], ModelSource] = {}


def source_for(model: Model) -> ModelSource:
    """The cheapest way for workers to get ``model`` (weights are put into the object store once
    per version of the weights; call with Ray connected)."""
    import ray

    signature = weights_signature(model.hf_model)
    loaded = _LOADED_FROM.get(model)
    if loaded is not None and loaded[2] == signature:
        return ModelSource(
            key=f"name:{loaded[0]}:{loaded[1]}", model_id=model.model_id, name=loaded[0], dtype=loaded[1]
        )
    if signature in _SHIPPED:
        return _SHIPPED[signature]
    key = f"weights:{id(model.hf_model)}:{hash(signature)}"
    hf_model = model.hf_model
    if _rebuilds_from_config(hf_model):
        state = {k: v.detach().cpu() for k, v in hf_model.state_dict().items()}
        source = ModelSource(key=key, model_id=model.model_id, config=hf_model.config, weights=ray.put(state))
    else:
        source = ModelSource(key=key, model_id=model.model_id, module=ray.put(hf_model))
    _SHIPPED.clear()  # keep one shipped model alive in the object store at a time
    _SHIPPED[signature] = source
    return source


def _rebuilds_from_config(hf_model: torch.nn.Module) -> bool:
    """Whether ``from_config`` gives the same module tree (checked on the meta device, no memory)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            rebuilt = AutoModelForCausalLM.from_config(hf_model.config)
    except (ValueError, TypeError, KeyError, ImportError):
        return False
    mine = [(name, type(m)) for name, m in hf_model.named_modules()]
    theirs = [(name, type(m)) for name, m in rebuilt.named_modules()]
    same_keys = set(hf_model.state_dict()) == set(rebuilt.state_dict())
    return mine == theirs and same_keys
