"""Cost accounting in passes over single prompts (design: partial forwards count (L - l) / L)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Cost:
    """Passes a method ran, over single prompts.

    Attributes:
        forward: forward passes; a forward started at layer l of L counts (L - l) / L.
        backward: backward passes; a backward that stops at layer l counts (L - l) / L.

    Example:
        >>> import atpstar
        >>> cost = atpstar.Cost(forward=8, backward=4)
        >>> cost.forward_equivalents
        16.0
        >>> print(cost + atpstar.Cost(forward=2))
        10.0 forward + 4.0 backward = 18.0 forward-equivalents
    """

    forward: float = 0.0
    backward: float = 0.0

    @property
    def forward_equivalents(self) -> float:
        """forward + 2 x backward, the unit the comparison harness ranks methods by."""
        return self.forward + 2.0 * self.backward

    def add_forward(self, prompts: float, start_layer: int = 0, n_layers: int = 1) -> None:
        self.forward += prompts * (n_layers - start_layer) / n_layers

    def add_backward(self, prompts: float, layers_covered: int = 1, n_layers: int = 1) -> None:
        self.backward += prompts * layers_covered / n_layers

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.forward + other.forward, self.backward + other.backward)

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "forward_equivalents": self.forward_equivalents}

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> Cost:
        return cls(float(data["forward"]), float(data["backward"]))

    def __str__(self) -> str:
        return f"{self.forward:.1f} forward + {self.backward:.1f} backward = {self.forward_equivalents:.1f} forward-equivalents"
