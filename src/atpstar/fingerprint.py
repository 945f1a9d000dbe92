"""Identity fingerprints: what made a result, so a result is never reused for something else.

An identity is a flat ``dict[str, str]`` recorded in every saved result (``info["identity"]``) and
checkpoint. ``check_identity`` compares two of them on chosen fields and names every field that
differs. Fields:

- ``weights``: SHA-256 of every parameter (names, shapes, values cast to float32, so the hash names
  the weights, not the dtype they are held in); computed once per loaded model and cached.
- ``model_config``: the architecture's configuration (minus names, paths and dtype).
- ``dtype``: the dtype the model computes in. ``tokenizer``: hash of the vocabulary.
- ``pairs``: hash of the prompt pairs' tokens and metric; ``metric``: the metric's name (and, for
  a callable, a hash of its code).
- ``dictionaries``: ``name=content hash`` of each dictionary whose latents are nodes (absent otherwise).
- ``direction``, ``node_types``, ``method``, ``options``, ``atpstar_version``, ``model_id`` (a label:
  never compared, the weights are).
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from .errors import IdentityMismatchError, UnsupportedModelError
from .version import __version__

# Fields that decide the numbers of a result on given prompt pairs (``check_identity`` default).
MODEL_FIELDS = ("weights", "model_config", "tokenizer")
PAIR_FIELDS = ("pairs", "metric", "direction")
RESULT_FIELDS = (*MODEL_FIELDS, "dtype", *PAIR_FIELDS, "method", "options", "atpstar_version", "dictionaries")

_WEIGHTS_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()
_CONFIG_SKIP = {"transformers_version", "torch_dtype", "dtype", "architectures", "attn_implementation"}


def weights_hash(hf_model: torch.nn.Module) -> str:
    """SHA-256 (16 hex digits) of the model's parameters; cached per model object."""
    cached = _WEIGHTS_CACHE.get(hf_model)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, values in _parameters(hf_model):
            values = values.float() if values.is_floating_point() else values
            digest.update(f"{name}:{tuple(values.shape)}:{values.dtype};".encode())
            # [numel * itemsize] raw bytes of the values
            digest.update(values.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    value = digest.hexdigest()[:16]
    _WEIGHTS_CACHE[hf_model] = value
    return value


def _parameters(hf_model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, values) of every parameter; weights offloaded by accelerate (meta tensors) are read from the
    offload hook's weights map, where accelerate keeps them on CPU or disk."""
    for module_name, module in hf_model.named_modules():
        for local, param in module.named_parameters(recurse=False):
            values = param.detach()
            if values.device.type == "meta":
                weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
                if weights_map is None or local not in weights_map:
                    raise UnsupportedModelError(
                        f"weight {module_name}.{local} is on the meta device and no offload hook holds its values; "
                        "load the model with its weights (device_map/offload through accelerate are supported)"
                    )
                values = weights_map[local]
            yield f"{module_name}.{local}" if module_name else local, values


def config_hash(config: Any) -> str:
    """Hash of the architecture configuration, without names, paths, versions and dtypes."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    kept = {k: v for k, v in data.items() if not k.startswith("_") and k not in _CONFIG_SKIP}
    return _short(json.dumps(kept, sort_keys=True, default=str))


def tokenizer_hash(tokenizer: Any) -> str:
    """Hash of the tokenizer's vocabulary (``"none"`` without a tokenizer)."""
    if tokenizer is None:
        return "none"
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else None
    if not vocab:
        return _short(type(tokenizer).__name__)
    return _short(json.dumps(sorted(vocab.items(), key=lambda item: item[1]), ensure_ascii=False))


def metric_fingerprint(metric: Any) -> str:
    """The metric's name; for a callable, its name and a hash of its code (two lambdas differ)."""
    if isinstance(metric, str):
        return metric
    name = getattr(metric, "__name__", type(metric).__name__)
    code = getattr(metric, "__code__", None)
    if code is None:
        return name
    return f"{name}#{_short(code.co_code + repr(code.co_consts).encode())}"


def identity(
    model: Any,
    pairs: Any,
    direction: str,
    node_types: Sequence[str] = (),
    method: str = "",
    options: dict[str, Any] | None = None,
) -> dict[str, str]:
    """The identity of a result computed by ``method`` on ``model`` and ``pairs``.

    Args:
        model: an ``atpstar.Model``.
        pairs: ``PromptPairs``.
        options: the options that change the numbers (bookkeeping ones such as ``checkpoint`` dropped).
    """
    from .dictionaries.registry import identity_of
    from .persist import to_jsonable

    kept = {k: v for k, v in (options or {}).items() if k not in BOOKKEEPING_OPTIONS}
    return {
        "atpstar_version": __version__,
        "model_id": str(model.model_id),
        "weights": weights_hash(model.hf_model),
        "model_config": config_hash(model.hf_model.config),
        "dtype": str(model.dtype).replace("torch.", ""),
        "tokenizer": tokenizer_hash(model.tokenizer),
        "pairs": pairs.fingerprint(),
        "metric": metric_fingerprint(pairs.metric),
        "direction": direction,
        "node_types": ",".join(node_types),
        "method": method,
        "options": json.dumps(to_jsonable(kept), sort_keys=True),
        **identity_of(node_types),  # "dictionaries": each dictionary's content hash (only when latents are nodes)
    }


# Options that do not change a result's numbers, only how it is computed or stored.
BOOKKEEPING_OPTIONS = frozenset({"checkpoint", "batch_size", "memory_gb", "min_chunk_tokens", "progress"})

_LABELS = {
    "weights": "model weights",
    "model_config": "model configuration",
    "dtype": "dtype",
    "tokenizer": "tokenizer",
    "pairs": "prompt pairs (tokens)",
    "metric": "metric",
    "direction": "direction",
    "node_types": "node types",
    "method": "method",
    "options": "method options",
    "atpstar_version": "atpstar version",
    "dictionaries": "dictionaries (name=content hash)",
}


def differences(saved: dict[str, Any] | None, current: dict[str, Any], fields: Iterable[str]) -> list[str]:
    """Human-readable ``field (saved X, now Y)`` for each of ``fields`` that differs."""
    saved = saved or {}
    out = []
    for name in fields:
        old, new = saved.get(name), current.get(name)
        if old != new:
            label = _LABELS.get(name, name)
            if old is None:
                out.append(f"{label} (not recorded in the saved result)")
            else:
                out.append(f"{label} ({_dict_changes(old, new) or f'saved {_show(old)}, now {_show(new)}'})")
    if out and "weights" in fields and saved.get("model_id") and saved.get("model_id") != current.get("model_id"):
        out.append(f"model (saved {saved['model_id']!r}, now {current.get('model_id')!r})")
    return out


def check_identity(
    saved: dict[str, Any] | None, current: dict[str, Any], what: str, fix: str, fields: Iterable[str] = RESULT_FIELDS
) -> None:
    """Refuse ``saved`` if it differs from ``current`` in any of ``fields``, naming every difference.

    Raises:
        IdentityMismatchError: "<what> does not match this run: <differences>. <fix>".
    """
    diff = differences(saved, current, tuple(fields))
    if diff:
        raise IdentityMismatchError(f"{what} does not match this run: {'; '.join(diff)}. {fix}")


REUSE_FIELDS = (*MODEL_FIELDS, "pairs", "metric", "dictionaries")


def check_reuse(result: Any, model: Any, pairs: Any, what: str, fix: str | None = None) -> None:
    """Refuse to reuse ``result`` (an estimate, a verification, any result with an ``identity``) on
    ``model`` and ``pairs`` unless it was made on the same weights, configuration, tokenizer, prompt
    pairs and metric; every verb that takes a finished result (verify, the bound, faithfulness curves,
    find's given estimate) checks it here, whatever its node space. A result without a recorded
    identity (built by hand, or read from a foreign format) is taken as it is.

    Args:
        result: has ``identity`` (``dict[str, str]`` or None).
        model: an ``atpstar.Model``.
        pairs: ``PromptPairs``.
        what: how the message names the result, e.g. ``"estimate (atp)"``.
        fix: what to do instead (default: use the model, tokenizer, pairs and metric it was made with).

    Raises:
        IdentityMismatchError: naming every field that differs.
    """
    saved = getattr(result, "identity", None)
    if saved is None:
        return
    check_identity(
        saved,
        identity(model, pairs, "", list(getattr(result, "node_types", ()))),
        what,
        fix or "Use the model, tokenizer, prompt pairs and metric it was made with.",
        fields=REUSE_FIELDS,
    )


def _dict_changes(old: Any, new: Any) -> str:
    """``key: saved X, now Y`` for each differing key when both values are JSON objects (e.g. options), else ""."""
    try:
        before, after = json.loads(old), json.loads(new)
    except (TypeError, ValueError):
        return ""
    if not isinstance(before, dict) or not isinstance(after, dict):
        return ""
    keys = sorted(k for k in set(before) | set(after) if before.get(k, "<unset>") != after.get(k, "<unset>"))
    return "; ".join(
        f"{k}: saved {_show(before.get(k, '<unset>'))}, now {_show(after.get(k, '<unset>'))}" for k in keys
    )


def _show(value: Any) -> str:
    text = str(value)
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _short(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]
