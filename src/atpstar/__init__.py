"""atpstar: find the components of a transformer LM that cause a behaviour.

Exact activation patching, Attribution Patching (AtP) and AtP* (Kramár et al. 2024).

Example:
    >>> import atpstar
    >>> model = atpstar.load_model("toy-ioi")
    >>> pairs = atpstar.tasks.ioi(model.tokenizer, 4, seed=0)
    >>> result = atpstar.attribute(model, pairs, method="atp*", nodes=["query", "key", "value", "head"])
    >>> [(node.name, round(node.score, 3)) for node in result.top(2)]
    [('blocks.1.attn.hook_k[pos 10, head 0]', 6.643), ('blocks.1.attn.hook_k[pos 10, head 1]', 5.587)]
    >>> sorted(atpstar.METHODS)
    ['activation_patching', 'atp', 'atp*', 'atp+graddrop', 'atp+ig', 'atp+qkfix', 'blocks', 'hierarchical', 'subsampling']
    >>> atpstar.NODE_TYPES
    ('neuron', 'query', 'key', 'value', 'head')
    >>> atpstar.__version__  # doctest: +ELLIPSIS
    '0...'
"""

from __future__ import annotations

from . import tasks, zoo
from .api import attribute, predict_memory
from .bound import FalseNegativeBound, false_negative_bound
from .cost import Cost
from .dictionaries import Dictionary, load_dictionary
from .edges import EdgeGraph, FaithfulnessCurve, edge_names, faithfulness_curve, load_mib
from .errors import (
    AtpstarError,
    BusyError,
    CorruptFileError,
    IdentityMismatchError,
    InputError,
    OutOfMemory,
    UnsupportedModelError,
)
from .evaluate import Evaluation, evaluate
from .find import Localization, find
from .jsonl import read_pairs_jsonl
from .loading import load_model
from .memory import MemoryPlan
from .methods import METHODS
from .model import Model
from .nodes import NODE_TYPES
from .pairs import PromptPairs
from .pairsets import PairSet
from .result import Attribution
from .sink import read_per_pair
from .verify import Verification, verify
from .version import __version__

__all__ = [
    "METHODS",
    "NODE_TYPES",
    "AtpstarError",
    "BusyError",
    "CorruptFileError",
    "IdentityMismatchError",
    "OutOfMemory",
    "Attribution",
    "Cost",
    "Dictionary",
    "EdgeGraph",
    "FaithfulnessCurve",
    "Evaluation",
    "FalseNegativeBound",
    "InputError",
    "Localization",
    "MemoryPlan",
    "Model",
    "PairSet",
    "PromptPairs",
    "UnsupportedModelError",
    "Verification",
    "__version__",
    "attribute",
    "edge_names",
    "faithfulness_curve",
    "load_dictionary",
    "load_mib",
    "evaluate",
    "false_negative_bound",
    "find",
    "load_model",
    "predict_memory",
    "read_pairs_jsonl",
    "read_per_pair",
    "tasks",
    "verify",
    "zoo",
]
