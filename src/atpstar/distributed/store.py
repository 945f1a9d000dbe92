"""Unit checkpoints: one folder per sweep, one file per finished work unit.

The folder's ``sweep.json`` names the sweep (kind, model, pairs fingerprint, direction, options); a
rerun with another sweep in the same folder is refused. Each unit's file is written atomically
(temporary file, then rename) by the driver when the unit's result arrives, so no two writers share a
path, an interrupted run leaves only whole files, and workers need no shared file system.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..cost import Cost
from ..errors import InputError
from .units import Unit, UnitResult

FORMAT_VERSION = 1


class UnitStore:
    """The checkpoint folder of one sweep.

    Args:
        path: the folder (created).
        key: what identifies the sweep; a folder holding another sweep's units is refused.
    """

    def __init__(self, path: str | os.PathLike[str], key: str) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise InputError(
                f"checkpoint {self.path} is a file, but runs on workers keep one file per work unit in a folder; "
                "choose a folder path (the in-process checkpoint file cannot be resumed on workers)"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = self.path / "sweep.json"
        if manifest.exists():
            saved = json.loads(manifest.read_text())
            if saved.get("key") != key:
                raise InputError(
                    f"checkpoint folder {self.path} holds work units of another sweep ({saved.get('key')!r}); "
                    "delete it or choose another folder"
                )
        else:
            _atomic_write_text(manifest, json.dumps({"format_version": FORMAT_VERSION, "key": key}, indent=1))

    def _file(self, unit: Unit) -> Path:
        return self.path / f"{unit.name}.safetensors"

    def load(self, unit: Unit) -> UnitResult | None:
        """The saved result of ``unit``, or None when it has not finished (an unreadable file is
        reported and the unit runs again)."""
        path = self._file(unit)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:  # the costs live in the header's metadata
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
                meta = handle.metadata()
            cost = Cost.from_dict(json.loads(meta["cost"]))
            prepare = Cost.from_dict(json.loads(meta["prepare"]))
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:  # torn or foreign file
            warnings.warn(
                f"atpstar: unit checkpoint {path} is unreadable ({err}); running that unit again", stacklevel=2
            )
            return None
        return UnitResult(tensors, cost, prepare)

    def save(self, unit: Unit, result: UnitResult) -> None:
        path = self._file(unit)
        tmp = path.with_name(path.name + ".tmp")
        meta = {"cost": json.dumps(result.cost.to_dict()), "prepare": json.dumps(result.prepare.to_dict())}
        save_file({k: v.contiguous() for k, v in result.tensors.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)

    def finished(self) -> int:
        """Number of unit files in the folder."""
        return sum(1 for _ in self.path.glob("*.safetensors"))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
