"""Prompt-pair families from the AtP* paper: IOI, city -> country recall, and random pairs of model samples.

Each generator is seeded and deterministic and returns one ``PromptPairs`` whose pairs all have the
same token length; ``mib`` reads MIB's released datasets into a ``PairSet`` (prompts of unequal length).

Example:
    >>> import atpstar
    >>> model = atpstar.load_model("toy-ioi")
    >>> pairs = atpstar.tasks.ioi(model.tokenizer, 8, seed=0)
    >>> pairs
    PromptPairs(n_pairs=8, seq_len=15, metric='logit_diff')
    >>> model.tokenizer.decode(pairs.clean[0]), model.tokenizer.decode(pairs.answer[0])
    ('Afterwards, Eric and Peter went to the house. Eric gave a ring to', ' Peter')
"""

from .cities import cities
from .ioi import ioi
from .mib import mib
from .random_pairs import random_pairs

__all__ = ["cities", "ioi", "mib", "random_pairs"]
