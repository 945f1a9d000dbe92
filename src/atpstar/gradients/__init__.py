"""One gradient step for every gradient-based estimator, nodes and edges.

- ``tape``: the backward passes of one differentiable forward (gradients handed to consumers as autograd
  forms them; GradDrop's partial backwards), written once for node and edge estimators.
- ``points``: where the gradient is taken, the base run (AtP) or a path of interpolated inputs (IG).
- ``step``: the node step (source and base runs, source - base at diff sites, the gradient runs) and the
  AtP product; ``consumers``: what node estimators do with a site's gradient (the product, the QK fix,
  GradDrop's running sums).
"""

from .points import AT_BASE, Points, path
from .step import GradientStep, atp_estimate, gradient_step, summed_over_points
from .tape import Consumer, Tape

__all__ = [
    "AT_BASE",
    "Consumer",
    "GradientStep",
    "Points",
    "Tape",
    "atp_estimate",
    "gradient_step",
    "path",
    "summed_over_points",
]
