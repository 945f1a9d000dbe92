"""The statistics of a false-negative bound: per-node Welch bounds and their combination over the nodes.

Subsampling runs over the unverified nodes only (verified nodes are never patched). Per node n,
ĉ(n) = mean over pairs of (mean_in - mean_out) estimates c(n) = mean over pairs of the effect, with
standard error se(n) from the in/out sample variances of every pair and Welch–Satterthwaite degrees
of freedom df(n) (rounded down: wider intervals). Per node, U(n) = |ĉ(n)| + t_{1-α, ⌊df⌋} se(n) is a
one-sided (1 - α) upper confidence bound on |c(n)|.

(a) ``max_effect_upper`` = max_n U(n) is a (1 - α) upper confidence bound on max_n |c(n)| with no
    multiplicity correction: the maximum is attained at one (unknown, fixed) node n*, and
    max_n U(n) >= U(n*) >= |c(n*)| whenever n*'s own interval holds, which happens with probability
    >= 1 - α. (``combine="bonferroni"`` gives the union bound instead: t_{1-α/(2N)}.)
(b) ``prob_upper`` = max_n p_n, where p_n is the p-value of H0_n: |c(n)| >= θ (the larger of the two
    one-sided tests at c = θ and c = -θ). This is the intersection-union test (Berger 1982) of
    "some unverified node has |c| >= θ": if node n0 has |c(n0)| >= θ, data as far below θ at every
    node as observed occurs with probability <= p_{n0} <= max_n p_n. It is exact (not conservative)
    when one node sits at θ and the others are far below, so no valid bound from the same per-node
    tests is smaller; the plain union bound min(1, Σ_n p_n) (``combine="bonferroni"``) is up to N
    times larger. Certifying "no unverified |c| >= θ" at level α is the same as max_n U(n) < θ.

Shape letters: P pairs, N nodes (all node types, flattened).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..methods.subsampling import SubsamplingStats
from ..ops import student_t_cdf, student_t_quantile, welch_finish, welch_sums

COMBINES: tuple[str, ...] = ("iut", "bonferroni")


@dataclass
class Summary:
    """The bound over the unverified nodes, from the per-node bounds."""

    max_upper: float  # max_n U(n) over the unverified nodes (0 when none is left)
    worst: int | None  # flat index of the node attaining it (None when none is left)
    prob_upper: float  # bound on P(some unverified |c| >= θ) (nan without θ)
    se_median: float  # typical and largest standard error of ĉ(n): what ``plan_samples`` needs next
    se_max: float


@dataclass
class NodeSums:
    """What the bound needs of Subsampling's per-pair statistics, summed over the pairs: each [N] float64.

    Sums over disjoint blocks of pairs add up (``+``), so the bound streams over pair blocks and never holds
    the [P, N] statistics of all pairs. From one block's statistics the sums are those ``node_bounds`` formed
    from [P, N] before (the same reductions), so a run in one block gives the same numbers bit for bit.

    Attributes:
        n_pairs: pairs summed over.
        diff: Σ_p (mean_in - mean_out).
        total, denom: ``ops.welch_sums`` over the in and out groups of every pair.
        short: bool, some pair has fewer than 2 samples in or out.
    """

    n_pairs: int
    diff: torch.Tensor
    total: torch.Tensor
    denom: torch.Tensor
    short: torch.Tensor

    @classmethod
    def of(cls, stats: SubsamplingStats) -> NodeSums:
        """The sums of per-pair statistics [P, N]."""
        diff = stats.flat("mean_in") - stats.flat("mean_out")  # [P, N]
        variances = torch.cat([stats.flat("var_in"), stats.flat("var_out")])  # [2P, N]
        counts = torch.cat([stats.flat("count_in"), stats.flat("count_out")])  # [2P, N]
        total, denom = welch_sums(variances, counts.clamp(min=1))
        return cls(int(diff.shape[0]), diff.sum(0), total, denom, (counts < 2).any(0))

    def __add__(self, other: NodeSums) -> NodeSums:
        return NodeSums(
            self.n_pairs + other.n_pairs,
            self.diff + other.diff,
            self.total + other.total,
            self.denom + other.denom,
            self.short | other.short,
        )


def node_bounds(
    stats: SubsamplingStats | NodeSums,
    keep: torch.Tensor,
    n_unverified: int,
    alpha: float,
    theta: float | None,
    combine: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per flat node: ĉ [N], upper bound on |c| [N], p-value of |c| >= theta [N], se [N] (nan: unusable)."""
    sums = NodeSums.of(stats) if isinstance(stats, SubsamplingStats) else stats
    n_pairs = sums.n_pairs
    estimate = sums.diff / n_pairs
    root, df = welch_finish(sums.total, sums.denom, sums.short)
    se = root / n_pairs
    usable = torch.isfinite(df) & (se > 0)
    upper = torch.full_like(estimate, float("inf"))
    upper = torch.where(se == 0, estimate.abs(), upper)  # every sample equal: no spread to bound
    upper = torch.where(torch.isnan(df), torch.full_like(upper, float("inf")), upper)
    if bool((usable & keep).any()):
        tail = alpha if combine == "iut" else alpha / (2 * max(n_unverified, 1))
        floor_df = df[usable & keep].floor().clamp(min=1.0, max=1e7)
        levels, inverse = torch.unique(floor_df, return_inverse=True)
        quantile = student_t_quantile(1.0 - tail, levels)[inverse]
        upper[usable & keep] = estimate[usable & keep].abs() + quantile * se[usable & keep]
    prob = torch.ones_like(estimate)
    if theta is not None:
        prob = torch.where((se == 0) & ~torch.isnan(df), (estimate.abs() >= theta).double(), prob)
        if bool(usable.any()):
            e, s, d = estimate[usable], se[usable], df[usable]
            at_plus = student_t_cdf((e - theta) / s, d)  # P(ĉ this low | c = θ)
            at_minus = 1.0 - student_t_cdf((e + theta) / s, d)  # P(ĉ this high | c = -θ)
            prob[usable] = torch.maximum(at_plus, at_minus)
    return estimate, upper, prob, torch.where(torch.isnan(df), torch.full_like(se, float("nan")), se)


def summarize(
    keep: torch.Tensor, upper: torch.Tensor, prob: torch.Tensor, se: torch.Tensor, theta: float | None, combine: str
) -> Summary:
    """Combine the per-node bounds (``node_bounds``; all [N]) over the unverified nodes ``keep`` [N] bool."""
    n_unverified = int(keep.sum())
    max_upper, worst = 0.0, None
    if n_unverified:
        flat_upper = torch.where(keep, upper, torch.full_like(upper, -1.0))
        max_upper, worst = float(flat_upper.max()), int(flat_upper.argmax())
    if theta is None:
        prob_upper = float("nan")
    elif n_unverified == 0:
        prob_upper = 0.0
    elif combine == "iut":
        prob_upper = float(prob[keep].max())
    else:
        prob_upper = min(1.0, float(prob[keep].sum()))
    finite_se = se[keep & torch.isfinite(se)]
    if len(finite_se) == 0:
        return Summary(max_upper, worst, prob_upper, float("nan"), float("nan"))
    return Summary(max_upper, worst, prob_upper, float(finite_se.median()), float(finite_se.max()))
