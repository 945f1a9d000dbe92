"""atpstar: find the components of a transformer LM that cause a behaviour.

Exact activation patching, Attribution Patching (AtP) and AtP* (Kramár et al. 2024).

Example:
    >>> import atpstar
    >>> model = atpstar.load_model("toy-ioi")
    >>> pairs = atpstar.tasks.ioi(model.tokenizer, n=8)
    >>> result = atpstar.attribute(model, pairs, method="atp*", nodes=["query", "key", "value", "head"])
    >>> result.top(10)
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import tasks, zoo
from .api import attribute
from .bound import FalseNegativeBound, false_negative_bound
from .cost import Cost
from .errors import AtpstarError, InputError, UnsupportedModelError
from .evaluate import Evaluation, evaluate
from .find import find
from .jsonl import read_pairs_jsonl
from .loading import load_model
from .localization import Localization
from .methods import METHODS
from .model import Model
from .nodes import NODE_TYPES
from .pairs import PromptPairs
from .result import Attribution
from .verify import Verification, verify

__all__ = [
    "METHODS",
    "NODE_TYPES",
    "AtpstarError",
    "Attribution",
    "Cost",
    "Evaluation",
    "FalseNegativeBound",
    "InputError",
    "Localization",
    "Model",
    "PromptPairs",
    "UnsupportedModelError",
    "Verification",
    "attribute",
    "evaluate",
    "false_negative_bound",
    "find",
    "load_model",
    "read_pairs_jsonl",
    "tasks",
    "verify",
    "zoo",
]
