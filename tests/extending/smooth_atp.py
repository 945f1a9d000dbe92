"""A toy gradient estimator, as a contributor would add one: AtP with the gradient averaged over noisy
copies of the base input (SmoothGrad). It swaps the points where the gradient step differentiates and
keeps everything else from ``atp+ig`` — the batch loop, sinks, memory plan, edges and cost.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from atpstar.gradients import Points
from atpstar.methods.ig import IntegratedGradients


@dataclass(frozen=True)
class NoisyPoints(Points):
    """``len(fractions)`` copies of the base embedding, each plus Gaussian noise of std ``scale``."""

    scale: float = 0.0
    seed: int = 0

    def inputs(self, base_embed: torch.Tensor, source_embed: torch.Tensor) -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(self.n):
            noise = torch.randn(base_embed.shape, generator=gen, dtype=base_embed.dtype)  # [b, T, D]
            yield base_embed + self.scale * noise.to(base_embed.device)


class SmoothAtp(IntegratedGradients):
    """AtP whose gradient is the mean over ``ig_steps`` noisy copies of the base input."""

    seeded = True
    ig_steps: int = 4  # noisy copies
    noise: float = 0.05  # std of the Gaussian noise added to the base embedding
    seed: int = 0

    def _points(self) -> Points:
        return NoisyPoints(tuple([1.0] * self.ig_steps), scale=self.noise, seed=self.seed)
