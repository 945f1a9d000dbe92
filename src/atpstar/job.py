"""``Job``: the run context every verb passes down instead of five loose parameters.

A job is one computation on one model and one set of prompt pairs in one direction: the pass
counter it adds to and whether it shows progress travel with it.

Example:
    >>> job = Job(model, pairs, "noising", Cost(), progress=False)  # doctest: +SKIP
    >>> job.base_and_source()  # (base tokens [P, T], source tokens [P, T])  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .cost import Cost
from .model import Model
from .pairs import PromptPairs


@dataclass
class Job:
    """One computation's context.

    Attributes:
        model: the wrapped model.
        pairs: the prompt pairs and their metric.
        direction: ``"noising"`` (base = clean, source = noise) or ``"denoising"``.
        cost: the pass counter every pass of the job adds to.
        progress: show progress bars.
    """

    model: Model
    pairs: PromptPairs
    direction: str
    cost: Cost = field(default_factory=Cost)
    progress: bool = False

    @property
    def n_pairs(self) -> int:
        return self.pairs.n_pairs

    @property
    def seq_len(self) -> int:
        return self.pairs.seq_len

    def base_and_source(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(base tokens [P, T], source tokens [P, T]) for this direction."""
        return self.pairs.base_and_source(self.direction)

    def with_cost(self, cost: Cost) -> Job:
        """The same job counting into another pass counter (e.g. one work unit's)."""
        return replace(self, cost=cost)

    def with_pairs(self, pairs: PromptPairs) -> Job:
        """The same job on other pairs (e.g. one block of them)."""
        return replace(self, pairs=pairs)

    def describe(self) -> dict[str, Any]:
        return {"model_id": self.model.model_id, "n_pairs": self.n_pairs, "direction": self.direction}
