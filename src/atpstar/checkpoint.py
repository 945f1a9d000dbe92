"""What every checkpoint shares: the file kind and the identity fields a resume must match.

Sweeps resume from folders of unit files (``atpstar.distributed.store.UnitStore``: one file per
finished work unit, the sweep's identity in ``sweep.json``); ``find`` from its journal
(``atpstar.find_resume``). Both refuse another computation's checkpoint, naming what differs.
"""

from __future__ import annotations

from .fingerprint import MODEL_FIELDS, PAIR_FIELDS

KIND = "checkpoint"
# Fields a checkpoint must share with the computation that resumes it.
CHECKPOINT_FIELDS = (*MODEL_FIELDS, "dtype", *PAIR_FIELDS, "method", "options", "atpstar_version")
