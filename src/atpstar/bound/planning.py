"""Planning a false-negative bound: how many samples, at which inclusion probability, and what it costs.

When a bound is informative: it can only fall below θ when θ is well above the noise of the largest
null estimate, about se × (sqrt(2 ln N) + t_{1-α}); se ≈ sqrt(Σ_unverified c_j(n)² / (samples·P)) for
near-additive effects, so verify the large nodes first (they dominate the sum) and pick ``samples``
from that (``plan_samples``). Small p keeps each joint patch close to a single-node patch (the
assumption); ``choose_p`` keeps about ``MIN_IN_SAMPLES`` samples with each node in. ``atpstar.find``
plans its rounds with these functions.
"""

from __future__ import annotations

import math

import torch

# Samples per pair with a node in that p is chosen for: Welch df >= ~31 per side and pair, where the
# one-sided t quantile at 0.95 is within 4% of the normal one; fewer makes the intervals heavy-tailed.
MIN_IN_SAMPLES = 32
MIN_SAMPLES = 64  # below this the in/out variances are too rough to bound anything
# Largest p a planned bound uses: with more nodes patched at once, joint patches stop adding up. On
# SmolLM2 IOI (about 10,000 attention nodes) p = 0.5 ranked a 0.68 node 5,726th, p = 0.05 first; on
# the toy model p = 0.5 inflated every standard error 10x. So planned bounds take at least
# MIN_IN_SAMPLES / P_MAX samples per pair.
P_MAX = 0.05
# Samples per pair with a node in that a planned bound needs at least: its per-node intervals are Welch t
# intervals with the degrees of freedom counted (about 15 per side and pair here; t_{0.99, 15} is 12 % above
# the normal quantile), so fewer in-samples make them wider, not wrong; calibration checks their coverage on
# exactly patched nodes. With p = P_MAX a node has fewer than 2 in-samples on a pair (no interval: flagged,
# then verified) with probability about 1e-6.
PLAN_IN_SAMPLES = 16
PLAN_MIN_SAMPLES = math.ceil(PLAN_IN_SAMPLES / P_MAX)
DEFAULT_SAMPLES = 256
# Planned samples are this factor above the noise-only estimate. It was 2 while a round that missed θ
# narrowly cost a whole new round; ``find`` now verifies the few nodes such a round flags and calibrates
# the same bound in the same round, so planning at the noise estimate itself is cheaper.
SAFETY = 1.0


def choose_p(samples: int) -> float:
    """Inclusion probability for ``samples`` samples per pair: the smallest p that keeps each node in about
    ``MIN_IN_SAMPLES`` of them (at most 0.5).

    Why small: Subsampling estimates each node's effect with about pN other nodes patched at once; the
    fewer there are, the closer that is to the single-node effect c(n) the bound is about. Under exact
    additivity the standard error does not depend on p (se² ≈ Σ c² / samples), so nothing is lost.
    """
    return min(0.5, MIN_IN_SAMPLES / samples)


def planned_p(samples: int) -> float:
    """Inclusion probability of a planned bound of ``samples`` per pair: ``choose_p``, at most ``P_MAX`` (a planned
    bound of fewer than ``MIN_IN_SAMPLES / P_MAX`` samples has each node in fewer than ``MIN_IN_SAMPLES``)."""
    return min(P_MAX, choose_p(samples))


def noise_quantile(n_unverified: int, alpha: float) -> float:
    """About how many standard errors max_n U(n) sits above 0 when no node has an effect: the expected
    maximum of N normal |estimates| (sqrt(2 ln N)-like, the 1 - 1/(2N) quantile) plus t_{1-α} (normal)."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    tail = 1.0 - 1.0 / (2 * max(n_unverified, 1))
    return float(normal.icdf(torch.tensor(tail, dtype=torch.float64)) + normal.icdf(torch.tensor(1.0 - alpha)))


def bound_cost(n_unverified: int, theta: float, alpha: float, sum_sq: float) -> float:
    """Forward equivalents (all pairs) a bound needs to fall below θ: SAFETY × q² V / θ² (see ``plan_samples``).

    Linear in V = mean over pairs of Σ c_j(n)²: verifying node n saves SAFETY q² mean_j c_j(n)² / θ² of it.
    """
    q = noise_quantile(n_unverified, alpha)
    return SAFETY * q * q * sum_sq / (theta * theta)


def plan_samples(n_unverified: int, n_pairs: int, theta: float, alpha: float, sum_sq: float) -> int:
    """Samples per pair so that a bound over ``n_unverified`` nodes can fall below ``theta``.

    With near-additive effects, se(n)² ≈ V / (samples · P) where V = mean over pairs of Σ_unverified
    c_j(n)² (``sum_sq``); max_n U(n) < θ needs θ >= se × ``noise_quantile``, so
    samples >= SAFETY × q² V / (θ² P). At least ``PLAN_MIN_SAMPLES`` (``PLAN_IN_SAMPLES`` with each node in at
    p = ``P_MAX``).
    """
    q = noise_quantile(n_unverified, alpha)
    return max(PLAN_MIN_SAMPLES, math.ceil(SAFETY * q * q * sum_sq / (theta * theta * n_pairs)))
