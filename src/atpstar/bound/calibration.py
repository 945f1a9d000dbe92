"""Calibration of a false-negative bound: does the interval hold for the single-node effect c(n)?

A bound is about Subsampling's estimand e(n) = E[mean_in - mean_out] over random joint patches, which equals
c(n) only when effects add up. When co-patched nodes interact, e(n) is pulled away from c(n) (on a saturated
attention toy e = 0.7 c), and a bound that is right about e(n) misses c(n). Calibration checks this on
nodes whose c(n) is then measured exactly (the caller patches them on the shared path, ``verify.patch_nodes``
or ``find``'s verification):

- the sample (``calibration_sample``): the ``CALIBRATION_TOP`` nodes the bound ranks highest (where a miss
  would be) plus ``CALIBRATION_RANDOM`` random nodes stratified by |ĉ| (``STRATA`` equal-count strata);
- the interaction shrinkage s (``shrinkage``): the slope of ĉ on c through the origin, weighted by 1/se²,
  over the checked nodes whose |c| is at least ``SIGNAL`` standard errors (elsewhere noise hides it), with
  a one-sided (1 - α_cal) lower confidence bound s_lo (normal; Student t with df = m - 1 when the residual
  dispersion of 3 or more nodes shows they shrink unequally, inflating its standard error);
- the widening κ = max(1, 1 / s_lo): U'(n) = κ U(n) covers c(n) wherever |c(n)| <= |e(n)| / s_lo;
- the check (``calibrate``): passes when s_lo > 0, no checked node has |c| >= θ (such a node is a miss the
  certificate would have made), at most the binomial (1 - α_cal) quantile of Bin(K, α) checked nodes lie
  outside their widened interval, and κ max U over the nodes left is < θ.

Level: the bound's intervals fail with probability <= α, the shrinkage's with <= α_cal, so the widened bound
holds with probability >= 1 - α - α_cal, under the assumption that the unchecked nodes shrink no more than
the checked ones do (the calibration sample is drawn to represent them: top-ranked plus stratified random).

Shape letters: K checked nodes, N nodes (flat).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..ops import student_t_quantile

CALIBRATION_TOP = 8  # the nodes the bound ranks highest: where a miss would be
CALIBRATION_RANDOM = 24  # random nodes, stratified by |ĉ|: what the rest looks like
STRATA = 4
SIGNAL = 3.0  # a checked node measures the shrinkage when |c| >= SIGNAL se (else noise hides it)
# Shrinkage a planned bound aims for: p is lowered until the measured shrinkage is about this (the
# shrinkage grows about linearly with the number of co-patched nodes, p N).
TARGET_SHRINK = 0.05

CALIBRATED_ASSUMPTION = (
    "Calibrated: the bound is about the quantity Subsampling estimates (mean_in - mean_out over random joint "
    "patches), which equals each node's single-node effect c(n) only when effects are additive. Calibration "
    "patched a sample of the unverified nodes exactly (the bound's highest-ranked and stratified random ones), "
    "measured how far joint patches shrink effects, and widened every interval by it; the certificate assumes "
    "the unchecked nodes shrink no more than the checked ones. Welch intervals assume near-normal sample means."
)


@dataclass(frozen=True)
class Shrinkage:
    """How far joint patches move effects: ĉ ≈ s c over the checked nodes that carry signal."""

    estimate: float  # ŝ (1: no interaction; nan when no node carries signal)
    lower: float  # one-sided (1 - alpha) lower confidence bound on s (1 when unmeasured)
    n_signal: int  # checked nodes with |c| >= SIGNAL se


@dataclass(frozen=True)
class Calibration:
    """What a certificate rests on: the calibration's figures and verdict (``calibrate``)."""

    checked: int  # nodes patched exactly
    top: int  # of them: the bound's highest-ranked
    random: int  # of them: stratified random
    n_signal: int  # checked nodes whose |c| measured the shrinkage
    shrinkage: float  # ŝ
    shrinkage_lower: float  # s_lo at level 1 - alpha
    widen: float  # κ = max(1, 1 / s_lo) (inf when s_lo <= 0)
    worst_ratio: float  # max over checked nodes of |c(n)| / U(n) (before widening)
    outside: int  # checked nodes with |c| > κ U(n)
    allowed: int  # at most this many (binomial (1 - alpha) quantile of Bin(checked, alpha_bound))
    large: int  # checked nodes with |c| >= θ that the bound ruled out (U < θ): misses it would have made
    max_upper: float  # κ × max U(n) over the nodes left unchecked
    alpha: float  # error rate of the calibration (the shrinkage bound and the count)
    alpha_bound: float  # error rate of the bound's intervals
    passed: bool
    reason: str  # why it failed ("" when it passed)

    @property
    def level(self) -> float:
        """Confidence of the widened bound: both the intervals and the shrinkage bound hold."""
        return 1.0 - self.alpha - self.alpha_bound

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "level": self.level}


def calibration_sample(
    upper: torch.Tensor, estimate: torch.Tensor, keep: torch.Tensor, seed: int, top: int, random: int
) -> tuple[torch.Tensor, int]:
    """Flat indices of the nodes to check ([K]: the bound's ``top`` highest U(n) first, then ``random`` drawn
    stratified by |ĉ| among the rest) and how many of them are top-ranked.

    Args:
        upper, estimate: [N] the bound's U(n) and ĉ(n); keep: [N] bool, the nodes the bound covers.
    """
    candidates = torch.nonzero(keep)[:, 0]
    ranked = candidates[torch.sort(upper[candidates], descending=True, stable=True).indices]
    chosen = ranked[:top]
    rest = ranked[top:]
    rest = rest[torch.sort(estimate[rest].abs(), stable=True).indices]  # strata of |ĉ|, smallest first
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for stratum, count in zip(rest.tensor_split(STRATA), _split(random, STRATA)):
        take = min(count, len(stratum))
        picks.append(stratum[torch.randperm(len(stratum), generator=generator)[:take]])
    return torch.cat([chosen, *picks]), len(chosen)


def shrinkage(exact: torch.Tensor, estimate: torch.Tensor, se: torch.Tensor, alpha: float) -> Shrinkage:
    """ŝ and its (1 - ``alpha``) lower confidence bound from checked nodes (all [K]: c, ĉ, se(ĉ)).

    Weighted least squares of ĉ on c through the origin (weights 1/se²) over the nodes with |c| >= SIGNAL se;
    its standard error is inflated by the residual dispersion (nodes that shrink unequally widen it; then the
    quantile is Student t with m - 1 df, else normal: the per-node se are known to many degrees of freedom).
    From fewer than 3 nodes the dispersion is not estimated.
    """
    finite = torch.isfinite(se) & (se > 0) & torch.isfinite(estimate)
    signal = finite & (exact.abs() >= SIGNAL * se.clamp(min=0))
    m = int(signal.sum())
    if m == 0:
        return Shrinkage(float("nan"), 1.0, 0)
    c, e, s = exact[signal], estimate[signal], se[signal]
    info = float((c * c / (s * s)).sum())
    slope = float((c * e / (s * s)).sum()) / info
    dispersion = 1.0
    if m >= 3:
        residual = (e - slope * c) / s
        dispersion = max(1.0, float((residual**2).sum()) / (m - 1))
    df = torch.tensor([float(m - 1) if dispersion > 1.0 else 1e7], dtype=torch.float64)  # se known: normal
    quantile = float(student_t_quantile(1.0 - alpha, df)[0])
    return Shrinkage(slope, slope - quantile * math.sqrt(dispersion / info), m)


def calibrate(
    checked: dict[str, torch.Tensor],
    top: int,
    rest_max_upper: float,
    theta: float,
    alpha: float,
    alpha_bound: float,
    flagged: int = 0,
) -> Calibration:
    """The verdict on a bound from its checked nodes.

    Args:
        checked: ``exact`` c(n), ``estimate`` ĉ(n), ``se`` se(ĉ(n)) and ``upper`` U(n) of the checked nodes ([K] each).
        top: how many of them were the bound's highest-ranked.
        rest_max_upper: max U(n) over the nodes the bound covers that were not checked (0 when none).
        theta: the effect size the certificate is about.
        alpha: error rate of the calibration; alpha_bound: the bound's.
        flagged: how many of the checked nodes (the first ones) the bound flagged (U >= θ) and were verified since:
            they measure the shrinkage and count against the intervals, but are no misses.
    """
    exact, upper = checked["exact"].abs(), checked["upper"]
    found = shrinkage(checked["exact"], checked["estimate"], checked["se"], alpha)
    widen = max(1.0, 1.0 / found.lower) if found.lower > 0 else math.inf
    widened = upper * widen if math.isfinite(widen) else torch.full_like(upper, math.inf)
    outside = int((exact > widened).sum())
    allowed = binomial_quantile(len(exact), alpha_bound, 1.0 - alpha)
    large = int((exact[flagged:] >= theta).sum())  # the flagged ones were not ruled out: no miss
    max_upper = rest_max_upper * widen if rest_max_upper > 0 else 0.0
    ratio = exact / upper.clamp(min=1e-300)
    reasons = []
    if not math.isfinite(widen):
        reasons.append(
            f"joint patches shrink effects too much to bound (shrinkage {found.estimate:.3g}, lower bound <= 0)"
        )
    if large:
        reasons.append(f"{large} checked node(s) have |c| >= {theta:g} although the bound ruled them out")
    if outside > allowed:
        reasons.append(f"{outside} checked nodes lie outside their widened intervals (at most {allowed} expected)")
    if math.isfinite(widen) and max_upper >= theta:
        reasons.append(f"widened by {widen:.3g} for the shrinkage, the bound {max_upper:.3g} is not below {theta:g}")
    return Calibration(
        checked=len(exact),
        top=top,
        random=len(exact) - top,
        n_signal=found.n_signal,
        shrinkage=found.estimate,
        shrinkage_lower=found.lower,
        widen=widen,
        worst_ratio=float(ratio.max()) if len(ratio) else 0.0,
        outside=outside,
        allowed=allowed,
        large=large,
        max_upper=max_upper,
        alpha=alpha,
        alpha_bound=alpha_bound,
        passed=not reasons,
        reason="; ".join(reasons),
    )


def next_p(p: float, measured: float, floor: float) -> float:
    """Inclusion probability of the next bound from the shrinkage ``measured`` at ``p`` (ŝ; nan: unmeasured).

    The shrinkage 1 - s grows about linearly with p (the co-patched nodes): aim for ``TARGET_SHRINK``, never
    lower p by more than 8x at once, never below ``floor``, never above ``p``.
    """
    if not math.isfinite(measured) or 1.0 - measured <= TARGET_SHRINK:
        return p
    return max(floor, p / 8, p * TARGET_SHRINK / (1.0 - measured))


def binomial_quantile(n: int, prob: float, level: float) -> int:
    """Smallest k with P(Bin(n, prob) <= k) >= level."""
    total, term = 0.0, (1.0 - prob) ** n
    for k in range(n + 1):
        total += term
        if total >= level - 1e-12:
            return k
        term *= (n - k) / (k + 1) * prob / (1.0 - prob)
    return n


def _split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` near-equal counts."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]
