"""Saving and loading, one way for every file atpstar writes.

- Every write is atomic: a temporary file in the same folder, then ``os.replace``; a crash leaves the
  old file or the new one, never half of one.
- A saved result is a *bundle*: ``NAME.json`` (facts) and ``NAME.safetensors`` (tensors). Both
  carry the file kind, the format version and a bundle id; the JSON also holds the SHA-256 of the
  tensor file. Loading checks all of these, so halves of two different saves, truncated files,
  other kinds of file and old formats are clear errors (``CorruptFileError``), never wrong data.
- ``save_json``/``load_json`` do the same for JSON-only files (evaluations, bounds).
- ``to_jsonable`` is the one converter from results to JSON-ready data.
- ``bundle_base`` turns a user path into the bundle's base name: only a ``.json`` or
  ``.safetensors`` suffix is dropped, every other dot is part of the name (``seed.1`` stays).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import CorruptFileError, InputError

FORMAT_VERSION = 2
SUFFIXES = (".json", ".safetensors")


def bundle_base(path: str | Path) -> Path:
    """``path`` without a ``.json`` or ``.safetensors`` suffix; other dots are part of the name."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in SUFFIXES else path


def bundle_paths(path: str | Path) -> tuple[Path, Path]:
    """(``NAME.json``, ``NAME.safetensors``) of the bundle at ``path``."""
    base = bundle_base(path)
    return Path(str(base) + ".json"), Path(str(base) + ".safetensors")


def bundle_exists(path: str | Path) -> bool:
    """True if either half of the bundle exists (a half alone is a broken bundle, reported on load)."""
    return any(p.exists() for p in bundle_paths(path))


def remove_bundle(path: str | Path) -> None:
    for p in bundle_paths(path):
        p.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path``; renamed onto ``path`` when the block ends without error.

    The folder of ``path`` is created when missing, as every writer of atpstar does. Errors name
    ``path`` or its folder, never the temporary file.

    Raises:
        InputError: the folder cannot be created, or the file cannot be written (disk full, read-only).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a part of the folder is a file, or a parent is read-only
        raise InputError(
            f"cannot write {path}: its folder {path.parent} does not exist and cannot be created "
            f"({err.strerror or err}); choose a writable folder"
        ) from err
    try:
        handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
    except OSError as err:
        raise InputError(f"cannot write {path}: {err.strerror or err}; choose a writable folder") from err
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:  # the message names ``path``, never the temporary file
        reason = err.strerror or str(err).replace(str(tmp), str(path))
        raise InputError(f"cannot write {path}: {reason} (disk full or folder not writable?)") from err
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


def save_bundle(path: str | Path, kind: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write ``meta`` to ``NAME.json`` and ``tensors`` to ``NAME.safetensors``, bound to each other.

    The tensor file is written first, then the JSON; a reader that finds a JSON finds its own tensors
    (matching bundle id and hash) or reports the pair as broken.
    """
    from safetensors.torch import save_file

    json_path, tensor_path = bundle_paths(path)
    bundle_id = uuid.uuid4().hex
    header = {"atpstar_kind": kind, "format_version": str(FORMAT_VERSION), "bundle_id": bundle_id}
    with atomic_path(tensor_path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=header)
        digest = file_sha256(tmp)
    record = {"kind": kind, "format_version": FORMAT_VERSION, "bundle_id": bundle_id, "tensors_sha256": digest}
    write_text(json_path, json.dumps({**record, **to_jsonable(meta)}, indent=1))


def load_bundle(path: str | Path, kind: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(meta, tensors) of a bundle written by ``save_bundle`` with this ``kind``.

    Raises:
        InputError: neither file exists.
        CorruptFileError: one half missing, truncated or corrupt files, another kind of file, another
            format version, or halves of two different saves.
    """
    from safetensors import safe_open

    json_path, tensor_path = bundle_paths(path)
    if not json_path.exists() and not tensor_path.exists():
        raise InputError(f"no saved {kind} at {bundle_base(path)}: need {json_path.name} and {tensor_path.name}")
    for p in (json_path, tensor_path):
        if not p.is_file():
            raise CorruptFileError(f"{p} is missing (the other half of the saved {kind} exists); save it again")
    meta = load_json(json_path, kind)
    if meta.get("tensors_sha256") != file_sha256(tensor_path):
        raise CorruptFileError(
            f"{tensor_path} does not match {json_path.name} (truncated, modified, or from another save); save it again"
        )
    try:
        with safe_open(str(tensor_path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for unreadable files
        raise CorruptFileError(f"{tensor_path} is not a readable safetensors file ({err}); save it again") from err
    if header.get("bundle_id") != meta.get("bundle_id"):
        raise CorruptFileError(f"{json_path.name} and {tensor_path.name} come from two different saves; save again")
    return meta, tensors


def save_tensors(path: str | Path, kind: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors file holding ``tensors`` and ``meta`` (in its header), with a hash of the tensors; atomic."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {
        "atpstar_kind": kind,
        "format_version": str(FORMAT_VERSION),
        "meta": json.dumps(to_jsonable(meta)),
        "tensors_sha256": _tensors_sha256(tensors),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def load_tensors(path: str | Path, kind: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(meta, tensors) of a file written by ``save_tensors``.

    Raises:
        InputError: the file does not exist.
        CorruptFileError: truncated or corrupt, another kind, another format version.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"no saved {kind} at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for unreadable files
        raise CorruptFileError(f"{path} is not a readable safetensors file (truncated or corrupt: {err})") from err
    if header.get("atpstar_kind") != kind:
        raise CorruptFileError(f"{path} holds {header.get('atpstar_kind') or 'something else'}, not a saved {kind}")
    if header.get("format_version") != str(FORMAT_VERSION):
        raise CorruptFileError(
            f"{path} is in format version {header.get('format_version')!r}; this atpstar reads version {FORMAT_VERSION}"
        )
    if header.get("tensors_sha256") != _tensors_sha256(tensors):
        raise CorruptFileError(f"{path}: its tensors do not match their recorded hash (corrupt)")
    try:
        meta = json.loads(header.get("meta", ""))
    except json.JSONDecodeError as err:
        raise CorruptFileError(f"{path}: unreadable metadata ({err})") from err
    return meta, tensors


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key].contiguous()
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())  # [numel * itemsize] raw bytes
    return digest.hexdigest()


def save_json(path: str | Path, kind: str, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON with its kind and the format version, atomically."""
    record = {"kind": kind, "format_version": FORMAT_VERSION}
    write_text(path, json.dumps({**record, **to_jsonable(data)}, indent=1))


def load_json(path: str | Path, kind: str) -> dict[str, Any]:
    """A JSON file written by ``save_json``/``save_bundle`` with this ``kind``, checked.

    Raises:
        InputError: the file does not exist.
        CorruptFileError: not UTF-8 JSON (e.g. truncated), another kind, another format version.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no saved {kind} at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError(f"{path} is not valid JSON (truncated or corrupt: {err}); save it again") from err
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path} is not a saved {kind} (expected a JSON object)")
    if data.get("kind") != kind:
        got = data.get("kind") or "a file without a kind (older atpstar or another program)"
        raise CorruptFileError(f"{path} holds {got}, not a saved {kind}")
    if data.get("format_version") != FORMAT_VERSION:
        raise CorruptFileError(
            f"{path} is in format version {data.get('format_version')!r}; this atpstar reads version "
            f"{FORMAT_VERSION}. Compute it again with this version."
        )
    return data


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def to_jsonable(value: Any) -> Any:
    """``value`` as JSON-ready data.

    Tensors and numpy arrays become lists (a one-element tensor its number), tuples lists, dict keys
    strings, non-finite floats the strings ``"nan"``, ``"inf"``, ``"-inf"`` (strict JSON has none),
    paths strings, and other objects their ``repr``.
    """
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.item() if value.numel() == 1 and value.ndim == 0 else value.tolist())
    if isinstance(value, os.PathLike):
        return str(value)
    try:
        import numpy as np

        if isinstance(value, np.ndarray):
            return to_jsonable(value.tolist())
        if isinstance(value, np.generic):
            return to_jsonable(value.item())
    except ImportError:  # pragma: no cover
        pass
    return repr(value)
