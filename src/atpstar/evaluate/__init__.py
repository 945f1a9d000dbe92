"""Cost of verified recall (``atpstar.evaluate``): how much an estimator plus verification costs to find the true top-K.

- ``harness``: ``evaluate`` and ``verified_recall_cost`` (the definitions and settings are in its docstring);
- ``record``: the ``Evaluation`` result (``MethodCurve`` per method), its tables and JSON files.
"""

from __future__ import annotations

from .harness import SETTINGS, VERIFICATION_UNITS, evaluate, verified_recall_cost
from .record import Evaluation, MethodCurve

__all__ = ["SETTINGS", "VERIFICATION_UNITS", "Evaluation", "MethodCurve", "evaluate", "verified_recall_cost"]
