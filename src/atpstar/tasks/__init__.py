"""Prompt-pair families from the AtP* paper: IOI, city -> country recall, and random pairs of model samples.

Each generator is seeded and deterministic and returns one ``PromptPairs`` whose pairs all have the
same token length.
"""

from .cities import cities
from .ioi import ioi
from .random_pairs import random_pairs

__all__ = ["cities", "ioi", "random_pairs"]
