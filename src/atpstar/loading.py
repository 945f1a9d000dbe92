"""``load_model``: a transformers object, a local folder, a hub id, or a built-in name -> ``Model``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import InputError
from .model import Model
from .origin import Origin, weights_signature
from .validate import check_device


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
        A ``Model`` in eval mode (switched with a warning if it was training); for a name or folder its
        ``origin`` records what was loaded (``atpstar.origin.Origin``), for a model object it is None.

    Raises:
        UnsupportedModelError: the family or an attention feature is not implemented.

    Example:
        >>> import atpstar
        >>> atpstar.load_model("toy-ioi")
        Model('toy-ioi', family=gpt_neox, layers=2, heads=4, kv_heads=4, d_head=32, d_mlp=512, dtype=torch.float32)
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
        check_device(device)
        hf_model = hf_model.to(device)
    # Ray workers load the same name instead of receiving the weights.
    origin = _origin(name, name in zoo.BUILTIN_MODELS, torch_dtype, device, hf_model)
    return Model(hf_model, tokenizer if tokenizer is not None else loaded_tokenizer, model_id=name, origin=origin)


def _origin(name: str, builtin: bool, dtype: torch.dtype, device: str | torch.device | None, hf_model: Any) -> Origin:
    """Where a model loaded by name came from; folders become absolute (workers may run elsewhere in the tree)."""
    if builtin:
        kind = "builtin"
    elif os.path.isdir(os.path.expanduser(name)):
        kind, name = "folder", os.path.abspath(os.path.expanduser(name))
    else:
        kind = "hub"
    dtype_name = str(dtype).removeprefix("torch.")
    return Origin(kind, name, dtype_name, None if device is None else str(device), weights_signature(hf_model))


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise InputError(f"dtype {dtype} is not a floating-point dtype; use torch.float32, float64 or bfloat16")
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise InputError(
            f"dtype {dtype!r} is not a floating-point dtype; use 'float32', 'float64', 'bfloat16' or 'float16'"
        )
    return value


def _from_pretrained(name: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """Folder or hub id through ``from_pretrained``; folders are checked first, an unreachable hub fails fast."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    local_only = _check_source(name)
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=local_only)
    except (OSError, ValueError) as err:
        raise InputError(
            f"could not load model {name!r}: not a built-in name, not a folder with config.json, and the hub "
            f"could not provide it ({_first_line(err)}). Built-in names: see 'atpstar models'"
        ) from err
    from .families import family_of

    family_of(config)  # check the family before loading weights
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, local_files_only=local_only, output_loading_info=True
        )
        hf_model, loading = loaded  # (model, {"missing_keys": ..., ...})
    except (OSError, ValueError, RuntimeError) as err:
        raise InputError(f"could not load the weights of model {name!r}: {_first_line(err)}") from err
    check_complete(hf_model, loading.get("missing_keys", ()), name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return hf_model.eval(), tokenizer


def check_complete(hf_model: Any, missing_keys: Any, name: str) -> None:
    """Refuse a model whose checkpoint lacks weights: transformers would fill them with random values.

    A weight tied to a loaded one (e.g. ``lm_head`` tied to the embeddings) is not missing.
    """
    absent = set(missing_keys)
    params = dict(hf_model.named_parameters(remove_duplicate=False))
    loaded = {id(param) for key, param in params.items() if key not in absent}
    missing = sorted(k for k in absent if k not in params or id(params[k]) not in loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise InputError(
            f"model {name!r} is missing {len(missing)} weight(s) in its checkpoint: {shown}; transformers would "
            "fill them with random values. Use a complete checkpoint (re-save it with save_pretrained)."
        )


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5")


def _check_source(name: str) -> bool:
    """Check a local folder's contents, or that the hub can be reached; True if only local files may be used."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"model {name!r} is a file; give the folder that holds config.json and the weights")
        if not (path / "config.json").is_file():
            raise InputError(
                f"model folder {name} has no config.json; a transformers model folder needs config.json and weights"
            )
        if not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
            raise InputError(
                f"model folder {name} has config.json but no weights (model.safetensors or pytorch_model.bin); "
                "save the model with save_pretrained"
            )
        return True
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise InputError(f"model folder {name} does not exist (and it is not a built-in name or a hub id)")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True  # transformers reads the local cache only; a miss is a clear error below
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    problem = _unreachable(endpoint)
    if problem:
        if _in_local_cache(name):
            return True
        raise InputError(
            f"cannot reach the Hugging Face hub at {endpoint} to download {name!r} ({problem}); check the network, "
            "give a local folder, or a built-in name ('atpstar models'). Set HF_HUB_OFFLINE=1 to use the local cache only."
        )
    return False


def _unreachable(endpoint: str, timeout: float = 3.0) -> str:
    """'' if a TCP connection to the endpoint opens within ``timeout`` seconds, else why not.

    The name lookup runs in a daemon thread: ``getaddrinfo`` ignores socket timeouts and can hang for
    tens of seconds without a resolver, which is the delay this probe exists to avoid.
    """
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    outcome: list[str] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append("")
        except OSError as err:
            outcome.append(f"{type(err).__name__}: {err}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer from {host} within {timeout:.0f} s"


def _in_local_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an old or missing huggingface_hub: treat as not cached
        return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
