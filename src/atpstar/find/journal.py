"""Resume of an interrupted ``find``: a journal of its expensive steps, replayed on a rerun.

``find`` is deterministic once the results of its expensive steps are fixed (the estimate, each
verification call, each bound), so its checkpoint holds those results, in the order they happened.
A rerun with the same identity runs the loop again; every step found in the journal is taken from it
(cost included, so the result reports the cost of the whole work, not twice the redone part) instead
of being computed, and the loop goes on from the first step that is not there. A step is written to
the journal when it completes (atomically, ``persist.save_tensors``); a step interrupted midway runs
again on the rerun. In-process verification of nodes is journaled one layer at a time (the same
forwards as one call), so a kill loses at most one layer's patching; a bound, and verification on Ray
workers or of edges, is one step.

Identity (``checkpoint.CHECKPOINT_FIELDS`` plus ``FIND_FIELDS``): model, dtype, pairs, metric,
direction, node types, theta, alpha, estimator (a method id with its options, or a digest of a given
estimate), the bound seed and the estimate-order window. Another identity is refused, naming what
differs. ``budget`` and ``max_rounds`` are not part of it: they only cut the loop short, so a rerun
with a larger budget continues where the journal ends; if a step then differs from its record (a
window the old budget cut short), that record and the later ones are discarded with a warning.
A truncated or corrupt checkpoint is reported (a warning) and the run starts afresh.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CHECKPOINT_FIELDS, KIND
from ..cost import Cost
from ..errors import CorruptFileError, InputError
from ..fingerprint import check_identity, identity
from ..persist import load_tensors, save_tensors, to_jsonable

# Identity fields of a find checkpoint beyond those of every checkpoint.
FIND_FIELDS = ("node_types", "theta", "alpha", "estimator", "seed, patience and estimator options")
CHECKPOINT_NAME = "find.ckpt.safetensors"

Step = tuple[dict[str, Any], dict[str, torch.Tensor]]  # (facts, tensors) of one completed step


def digest(tensor: torch.Tensor) -> str:
    """Content hash of a tensor (identifies a node list or an estimate across processes)."""
    data = tensor.detach().cpu().contiguous()
    return hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:24]


def find_identity(
    model: Any,
    pairs: Any,
    direction: str,
    node_types: list[str],
    theta: float,
    alpha: float,
    estimator: str,
    options: dict[str, Any],
) -> dict[str, str]:
    """The identity of one ``find`` computation (``estimator``: a method id with options, or a digest)."""
    current = identity(model, pairs, direction, node_types, "find", {})
    current.update(
        {
            "theta": repr(float(theta)),
            "alpha": repr(float(alpha)),
            "estimator": estimator,
            FIND_FIELDS[-1]: repr(options),
        }
    )
    return current


@dataclass
class FindJournal:
    """The completed steps of one ``find`` call, and where the replay stands.

    Attributes:
        path: the checkpoint file (None: nothing is saved, every step is computed).
        identity: the computation's identity (``find_identity``).
        records: per completed step, its facts (``kind``, ``key``, and what the step returned).
        tensors: per completed step ``i``, its tensors under ``"{i}/name"``.
        position: the next step of the loop (steps before it were replayed or computed).
        replayed: steps taken from the checkpoint in this call.
        replayed_cost: forward equivalents of the replayed steps.
    """

    path: Path | None
    identity: dict[str, str]
    records: list[dict[str, Any]] = field(default_factory=list)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    position: int = 0
    replayed: int = 0
    replayed_cost: float = 0.0
    last_replayed: bool = False  # whether the last ``step`` came from the checkpoint

    @classmethod
    def open(cls, path: str | Path | None, current: dict[str, str], recompute: bool = False) -> FindJournal:
        """The journal at ``path``: its steps if it holds this computation's, else empty.

        Raises:
            IdentityMismatchError: the checkpoint belongs to another computation (names what differs).
        """
        if path is None:
            return cls(None, current)
        path = Path(path)
        if path.is_dir():
            raise InputError(f"checkpoint {path} is a folder; give a file path (or out_dir= for a folder)")
        if recompute:
            path.unlink(missing_ok=True)
        if not path.exists():
            return cls(path, current)
        try:
            meta, tensors = load_tensors(path, KIND)
            saved_identity = meta["identity"]
            records = list(meta["records"])
        except (CorruptFileError, KeyError, TypeError, ValueError) as err:
            warnings.warn(f"atpstar: find checkpoint {path} is unusable ({err}); starting afresh", stacklevel=3)
            return cls(path, current)
        check_identity(
            saved_identity,
            current,
            f"find checkpoint {path}",
            "Delete it, choose another checkpoint path or out_dir, or pass recompute=True (--recompute).",
            fields=(*CHECKPOINT_FIELDS, *FIND_FIELDS),
        )
        return cls(path, current, records, tensors)

    @property
    def saved_steps(self) -> int:
        return len(self.records)

    def step(self, kind: str, key: dict[str, Any], compute: Callable[[], Step]) -> Step:
        """The result of the loop's next step: replayed when the journal holds it, else computed and saved.

        Args:
            kind: ``"estimate"``, ``"verify"`` or ``"bound"``.
            key: what the step is asked to do (JSON-able); a record answers only the same request.
            compute: runs the step; returns (facts incl. ``"cost"`` as ``Cost.to_dict()``, tensors).
        """
        key = to_jsonable(key)  # as a reloaded record holds it
        index = self.position
        if index < len(self.records):
            record = self.records[index]
            if record["kind"] == kind and record["key"] == key:
                self.position += 1
                self.last_replayed = True
                self.replayed += 1
                self.replayed_cost += Cost.from_dict(record["facts"]["cost"]).forward_equivalents
                prefix = f"{index}/"
                return finite(record["facts"]), {
                    k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)
                }
            warnings.warn(
                f"atpstar: find checkpoint {self.path}: step {index + 1} ({kind}) differs from the saved one "
                f"({record['kind']}; a different budget or max_rounds?); recomputing from there",
                stacklevel=3,
            )
            self._truncate(index)
        self.last_replayed = False
        facts, tensors = compute()
        facts = finite(to_jsonable(facts))  # what a replay returns, so both runs continue alike
        self.records.append({"kind": kind, "key": key, "facts": facts})
        self.tensors.update({f"{index}/{name}": value for name, value in tensors.items()})
        self.position += 1
        self._save()
        return facts, tensors

    def _truncate(self, index: int) -> None:
        self.records = self.records[:index]
        keep = {str(i) for i in range(index)}
        self.tensors = {k: v for k, v in self.tensors.items() if k.split("/", 1)[0] in keep}

    def _save(self) -> None:
        if self.path is None:
            return
        spent = Cost()
        for record in self.records:
            spent = spent + Cost.from_dict(record["facts"]["cost"])
        meta = {"identity": self.identity, "cost": spent.to_dict(), "records": self.records}
        save_tensors(self.path, KIND, meta, self.tensors)


def finite(value: Any) -> Any:
    """Undo JSON's spelling of non-finite floats (``persist.to_jsonable`` writes them as strings)."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    if value in ("nan", "inf", "-inf"):
        return float(value)
    return value
