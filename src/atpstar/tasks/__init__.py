"""Prompt-pair families from the AtP* paper: IOI, city -> country recall, and random pairs of model samples.

Each generator is seeded and deterministic and returns one ``PromptPairs`` whose pairs all have the
same token length; ``mib`` reads MIB's released datasets into a ``PairSet`` (prompts of unequal length).
"""

from .cities import cities
from .ioi import ioi
from .mib import mib
from .random_pairs import random_pairs

__all__ = ["cities", "ioi", "mib", "random_pairs"]
