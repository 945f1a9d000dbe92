"""The contract every attribution method meets, as checks a method's author can run.

    >>> from atpstar.testing import check_method
    >>> check_method(MyMethod)  # doctest: +SKIP

runs the same checks the package runs on every registered method (``tests/methods/test_contract.py``):
capabilities declared, documented shapes and record, same answer twice, per-pair results independent
of the other pairs, cost equal to the declared ``expected_cost``, save/load round trip, model left as
it was (also after an error), bad input refused before any pass, edges (or their refusal), and work
units (pair blocks or the method's own units equal the in-process result). A failed check raises
``AssertionError`` naming the check and the method.

The default model is a tiny random float64 Llama with grouped-query attention (built offline from a
config); pass ``model=``/``pairs=`` to check on your own.
"""

from __future__ import annotations

from .contract import CHECKS, Contract, MethodLike, check_method, contract
from .fixtures import VOCAB, assert_unchanged, snapshot, tiny_model, tiny_pairs

__all__ = [
    "CHECKS",
    "VOCAB",
    "Contract",
    "MethodLike",
    "assert_unchanged",
    "check_method",
    "contract",
    "snapshot",
    "tiny_model",
    "tiny_pairs",
]
