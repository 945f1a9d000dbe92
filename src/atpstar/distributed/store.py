"""Unit checkpoints: one folder per sweep, one file per finished work unit.

The folder's ``sweep.json`` holds the sweep's identity (``fingerprint.identity``: weights hash, dtype,
tokenizer, pair tokens, metric, direction, node types, options, version, plus the sweep's own layout);
a rerun of another computation in the same folder is refused with a message naming what differs. Each unit's file is written atomically
(temporary file, then rename) by the driver when the unit's result arrives, so no two writers share a
path, an interrupted run leaves only whole files, and workers need no shared file system.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..cost import Cost
from ..errors import CorruptFileError, InputError
from ..fingerprint import check_identity
from ..persist import atomic_path, load_json, save_json, to_jsonable
from .units import Unit, UnitResult

MANIFEST_KIND = "unit-sweep"


def saved_layout(path: str | Path | None) -> Any:
    """The layout (``identity["layout"]``, decoded) saved in checkpoint folder ``path``; None when there is none
    or it cannot be read (the store reports that when it opens the folder)."""
    manifest = Path(path) / "sweep.json" if path is not None else None
    if manifest is None or not manifest.is_file():
        return None
    try:
        return json.loads(load_json(manifest, MANIFEST_KIND)["identity"]["layout"])
    except (CorruptFileError, KeyError, TypeError, ValueError):
        return None


class UnitStore:
    """The checkpoint folder of one sweep.

    Args:
        path: the folder (created).
        identity: what identifies the sweep (field -> text); a folder holding another sweep's units is
            refused, naming the fields that differ.
    """

    def __init__(self, path: str | Path, identity: dict[str, Any]) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise InputError(
                f"checkpoint {self.path} is a file, but checkpoints are folders holding one file per finished work "
                "unit (a single-file checkpoint of atpstar 0.2 cannot be resumed): delete it or choose a folder "
                "path, and run again"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = self.path / "sweep.json"
        if not manifest.exists():
            save_json(manifest, MANIFEST_KIND, {"identity": identity})
            return
        try:
            saved = load_json(manifest, MANIFEST_KIND)["identity"]
        except (CorruptFileError, KeyError) as err:
            raise InputError(
                f"checkpoint folder {self.path} has an unreadable sweep.json ({err}); its units cannot be trusted: "
                "delete the folder and run again"
            ) from err
        check_identity(
            saved,
            identity,
            f"checkpoint folder {self.path}",
            "Delete the folder (or choose another checkpoint folder) and run again.",
            fields=sorted(set(saved) | set(identity), key=lambda f: (f == "layout", f)),  # causes before layout
        )

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
            facts = json.loads(meta.get("meta", "{}"))
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:  # torn or foreign file
            warnings.warn(
                f"atpstar: unit checkpoint {path} is unreadable ({err}); running that unit again", stacklevel=2
            )
            return None
        return UnitResult(tensors, cost, prepare, facts)

    def save(self, unit: Unit, result: UnitResult) -> None:
        meta = {
            "cost": json.dumps(result.cost.to_dict()),
            "prepare": json.dumps(result.prepare.to_dict()),
            "meta": json.dumps(to_jsonable(result.meta)),
        }
        with atomic_path(self._file(unit)) as tmp:
            save_file({k: v.contiguous() for k, v in result.tensors.items()}, str(tmp), metadata=meta)

    def finished(self) -> int:
        """Number of unit files in the folder."""
        return sum(1 for _ in self.path.glob("*.safetensors"))
