"""Checkpoints of long sweeps: partial results saved as they complete, resumed only by the same computation.

A checkpoint is one safetensors file (``persist.save_tensors``) with the partial tensors, the
identity of the computation (``fingerprint.identity``) and the cost spent on the saved part. It is
written soon after the sweep starts and then regularly (``CheckpointSchedule``), and on interrupt.

- Same identity: the sweep resumes, and the cost it reports is the saved part's cost plus the new
  part's, i.e. the whole computation's cost (work redone after a kill is not counted twice).
- Other identity (weights, dtype, tokenizer, pairs, metric, direction, version): refused, naming what
  differs; delete the file, choose another path, or pass ``--recompute`` on the command line.
- Corrupt or truncated: reported (a warning) and the sweep starts afresh.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cost import Cost
from .errors import CorruptFileError
from .fingerprint import MODEL_FIELDS, PAIR_FIELDS, check_identity
from .persist import load_tensors, save_tensors

KIND = "checkpoint"
# Fields a checkpoint must share with the computation that resumes it.
CHECKPOINT_FIELDS = (*MODEL_FIELDS, "dtype", *PAIR_FIELDS, "method", "options", "atpstar_version")


@dataclass
class CheckpointSchedule:
    """When to save: first after ``first_s`` seconds, then every ``every_s`` seconds, and whenever
    ``fraction`` of the work was done since the last save (whichever comes first).

    Attributes:
        first_s: seconds before the first save (a kill soon after the start keeps what was done).
        every_s: seconds between later saves.
        fraction: save after this share of the total work, however fast it went.
    """

    first_s: float = 5.0
    every_s: float = 30.0
    fraction: float = 0.1
    _last: float = field(default_factory=time.monotonic)
    _saved_once: bool = False
    _done_at_last: int = 0

    def due(self, done: int, total: int) -> bool:
        """True if a save is due now, with ``done`` of ``total`` work units finished."""
        interval = self.every_s if self._saved_once else self.first_s
        return time.monotonic() - self._last >= interval or done - self._done_at_last >= self.fraction * max(1, total)

    def saved(self, done: int) -> None:
        self._last, self._saved_once, self._done_at_last = time.monotonic(), True, done


def save_checkpoint(path: str | Path, identity: dict[str, str], tensors: dict[str, torch.Tensor], cost: Cost) -> None:
    """Write the partial ``tensors`` with the identity and the cost of the saved part (atomic)."""
    save_tensors(path, KIND, {"identity": identity, "cost": cost.to_dict()}, tensors)


def load_checkpoint(path: str | Path | None, identity: dict[str, str]) -> tuple[dict[str, torch.Tensor], Cost] | None:
    """The saved (tensors, cost) if ``path`` holds a checkpoint of this computation; None if there is none.

    Raises:
        IdentityMismatchError: the checkpoint belongs to another computation (the message names what differs).
    """
    if not path or not Path(path).exists():
        return None
    try:
        meta, tensors = load_tensors(path, KIND)
        saved_identity: Any = meta["identity"]
        cost = Cost.from_dict(meta["cost"])
    except (CorruptFileError, KeyError, TypeError, ValueError) as err:
        warnings.warn(f"atpstar: checkpoint {path} is unusable ({err}); starting afresh", stacklevel=2)
        return None
    check_identity(
        saved_identity,
        identity,
        f"checkpoint {path}",
        "Delete it, choose another checkpoint path, or pass --recompute on the command line.",
        fields=CHECKPOINT_FIELDS,
    )
    return tensors, cost
