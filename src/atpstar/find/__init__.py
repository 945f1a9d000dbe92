"""Certified localization (``atpstar.find``): every node with |c(n)| >= θ, and a certificate that no other is.

- ``loop``: the ``find`` verb (the loop, its rules and cost are in that module's docstring);
- ``options``: its options, checked once; ``stages``: the estimate-order stage, the bound rounds, the result;
- ``state``: the search state (population, what was verified, costs), verification through ``verify.patch_nodes``;
- ``engines``: what each node-space engine's steps cost; ``journal``: the resume journal of the expensive
  steps; ``localization``: the ``Localization`` record.
"""

from __future__ import annotations

from .localization import Localization
from .loop import find

__all__ = ["Localization", "find"]
