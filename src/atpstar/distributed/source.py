"""How a worker gets the model: by name, or from the driver's weights in Ray's object store.

- A model with an ``origin`` (``load_model`` of a built-in name, folder or hub id) whose weights are
  unchanged since loading is loaded by every worker from that name (nothing large crosses the network).
- Any other model is shipped: its config and ``state_dict`` when ``from_config`` rebuilds the same
  module tree, else the pickled module itself (custom modules swapped in by the user). The weights
  are put into the object store once and referenced, so every worker reads the same copy.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from ..model import Model
from ..origin import weights_signature


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

# Modules every worker can import; anything else (a test file, a notebook helper, a script's module)
# is pickled by value so workers need not import it.
_LIBRARIES = {"torch", "transformers", "atpstar", "accelerate", "numpy", "safetensors", "tokenizers", "builtins"}


def pickle_by_value(*objects: Any) -> None:
    """Have Ray pickle the user-defined classes and functions among ``objects`` (e.g. a custom metric or a
    module swapped into the model) by value, not by a reference to a module workers may not import."""
    from ray import cloudpickle

    for obj in objects:
        name = getattr(obj, "__module__", None)
        if not name or name == "__main__" or name.split(".")[0] in _LIBRARIES:
            continue  # __main__ is pickled by value already
        if name in sys.modules:
            cloudpickle.register_pickle_by_value(sys.modules[name])


def source_for(model: Model) -> ModelSource:
    """The cheapest way for workers to get ``model`` (weights are put into the object store once
    per version of the weights; call with Ray connected)."""
    import ray

    signature = weights_signature(model.hf_model)
    origin = model.origin
    if origin is not None and origin.weights == signature:
        return ModelSource(
            key=f"name:{origin.name}:{origin.dtype}", model_id=model.model_id, name=origin.name, dtype=origin.dtype
        )
    if signature in _SHIPPED:
        return _SHIPPED[signature]
    key = f"weights:{id(model.hf_model)}:{hash(signature)}"
    hf_model = model.hf_model
    if _rebuilds_from_config(hf_model):
        state = {k: v.detach().cpu() for k, v in hf_model.state_dict().items()}
        source = ModelSource(key=key, model_id=model.model_id, config=hf_model.config, weights=ray.put(state))
    else:
        pickle_by_value(*{type(m) for m in hf_model.modules()})
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
