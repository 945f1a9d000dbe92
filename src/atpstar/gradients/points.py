"""Where a gradient step takes its gradients: the base run, or a path of interpolated inputs.

AtP differentiates at the base run. Integrated gradients (``atp+ig``; EAP-IG on edges, Hanna et al.
2024) average the gradient over m runs whose input embeddings lie on the line from the source to the
base prompt, EAP-IG's left Riemann schedule:
    x_k = e(x_source) + (k / m)(e(x_base) - e(x_source)),  k = 0 .. m - 1,
    Î_IG(n) = (n(x_source) - n(x_base)) · (1/m) Σ_k ∂L/∂n (x_k).
The differences stay those of the real base and source runs. A method built on the step swaps its
points, as Captum's LayerIntegratedGradients swaps IntegratedGradients' gradient function.

Cost per pair: at the base run, the base forward is the gradient run (2 forwards + 1 backward); on a
path of m points, 2 forwards for the differences + m forwards and m backwards.

Shape letters: b pairs, T positions, D d_model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Points:
    """The inputs a gradient step differentiates at.

    Attributes:
        fractions: None for the base run itself (AtP, whose base forward is the gradient run); else the
            points x = e(x_source) + α (e(x_base) - e(x_source)), one α per gradient run, each run a forward
            of its own (``path(m)``: α = k / m; ``(1.0,)`` is the base input again, through a second forward).
    """

    fractions: tuple[float, ...] | None = None

    @property
    def at_base(self) -> bool:
        """The gradient is the base run's own: the base forward keeps its graph, no extra forwards."""
        return self.fractions is None

    @property
    def n(self) -> int:
        """Gradient runs per step: 1 at the base run, else one per fraction."""
        return 1 if self.fractions is None else len(self.fractions)

    def inputs(self, base_embed: torch.Tensor, source_embed: torch.Tensor) -> Iterator[torch.Tensor]:
        """The interpolated embeddings [b, T, D] in order (the base embedding itself at the base run)."""
        if self.fractions is None:
            yield base_embed
            return
        for alpha in self.fractions:
            yield source_embed + alpha * (base_embed - source_embed)  # [b, T, D]

    def mean(self, total: torch.Tensor) -> torch.Tensor:
        """A sum over the points, over their number: the path's average (unchanged at the base run)."""
        return total if self.fractions is None else total / len(self.fractions)


AT_BASE = Points()


def path(steps: int) -> Points:
    """m = ``steps`` inputs from the source towards the base embeddings, α = k / m for k = 0 .. m - 1
    (integrated gradients' left Riemann sum)."""
    return Points(tuple(k / steps for k in range(steps)))
