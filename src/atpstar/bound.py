"""A bound on the false negatives left after verification (spec §9).

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

When it is informative: the bound can only fall below θ when θ is well above the noise of the
largest null estimate, about se × (sqrt(2 ln N) + t_{1-α}); se ≈ sqrt(Σ_unverified c_j(n)² / (samples·P))
for near-additive effects, so verify the large nodes first (they dominate the sum) and pick
``samples`` from that (``plan_samples``). Small p keeps each joint patch close to a single-node patch
(the assumption); ``choose_p`` keeps about ``MIN_IN_SAMPLES`` samples with each node in.

Cost: 2P full forwards and ``samples`` × P patched forwards (as Subsampling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .cost import Cost
from .errors import InputError
from .fingerprint import MODEL_FIELDS, check_identity, identity
from .methods.subsampling import check_options, sample_batch
from .model import as_model
from .nodes import EDGE_TYPE, NodeLayout, check_node_types, node_name
from .ops import student_t_cdf, student_t_quantile, welch_se_df
from .pairs import PromptPairs, check_direction
from .sweeps.subsampling import SubsamplingStats
from .validate import check_number, check_pairs_fit
from .verify import Verification

ASSUMPTION = (
    "Assumes node effects are close to additive: the bound is about the quantity Subsampling estimates, "
    "mean_in - mean_out over random joint patches of the unverified nodes, which equals each node's "
    "single-node effect c(n) (mean over these prompt pairs) only when effects add up; interactions "
    "between nodes can hide effects the bound does not see. Welch intervals also assume near-normal "
    "sample means."
)

COMBINES: tuple[str, ...] = ("iut", "bonferroni")
# Samples per pair with a node in that p is chosen for: Welch df >= ~31 per side and pair, where the
# one-sided t quantile at 0.95 is within 4% of the normal one; fewer makes the intervals heavy-tailed.
MIN_IN_SAMPLES = 32
MIN_SAMPLES = 64  # below this the in/out variances are too rough to bound anything
# Largest p a planned bound uses: with more nodes patched at once, joint patches stop adding up. On
# SmolLM2 IOI (about 10,000 attention nodes) p = 0.5 ranked a 0.68 node 5,726th, p = 0.05 first; on
# the toy model p = 0.5 inflated every standard error 10x. So planned bounds take at least
# MIN_IN_SAMPLES / P_MAX samples per pair.
P_MAX = 0.05
PLAN_MIN_SAMPLES = math.ceil(MIN_IN_SAMPLES / P_MAX)
DEFAULT_SAMPLES = 256
# Planned samples are this factor above the noise-only estimate: se varies across nodes, the variance
# estimate itself is noisy, and a round that misses θ narrowly costs a whole new round (on SmolLM2 IOI
# 1.5 missed by 10%).
SAFETY = 2.0


def choose_p(samples: int) -> float:
    """Inclusion probability for ``samples`` samples per pair: the smallest p that keeps each node in about
    ``MIN_IN_SAMPLES`` of them (at most 0.5).

    Why small: Subsampling estimates each node's effect with about pN other nodes patched at once; the
    fewer there are, the closer that is to the single-node effect c(n) the bound is about. Under exact
    additivity the standard error does not depend on p (se² ≈ Σ c² / samples), so nothing is lost.
    """
    return min(0.5, MIN_IN_SAMPLES / samples)


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
    samples >= SAFETY × q² V / (θ² P). At least ``PLAN_MIN_SAMPLES`` (so that p <= ``P_MAX``).
    """
    q = noise_quantile(n_unverified, alpha)
    return max(PLAN_MIN_SAMPLES, math.ceil(SAFETY * q * q * sum_sq / (theta * theta * n_pairs)))


@dataclass
class FalseNegativeBound:
    """How large an effect could still hide among the unverified nodes.

    Attributes:
        max_effect_upper: (1 - alpha) upper confidence bound on max |c(n)| over unverified nodes
            (inf when some node had fewer than 2 samples in or out on some pair; 0 when none is left).
        prob_upper: upper bound on the probability that some unverified node has |c(n)| >= theta
            (nan when theta is None).
        theta: the effect size of ``prob_upper``.
        alpha: confidence level of ``max_effect_upper``.
        n_unverified: number of nodes the bound covers.
        worst_node: ``(node_type, index)`` attaining ``max_effect_upper`` (None when none is left).
        assumption: the assumption the bound rests on (say it with the numbers).
        cost: passes run (the Subsampling over unverified nodes).
        estimate, upper: node type -> [*layout] ĉ(n) and its upper bound on |c(n)| (nan at verified nodes).
        direction: ``"noising"`` or ``"denoising"``.
    """

    max_effect_upper: float
    prob_upper: float
    theta: float | None
    alpha: float
    n_unverified: int
    worst_node: tuple[str, tuple[int, ...]] | None
    assumption: str
    cost: Cost
    direction: str
    estimate: dict[str, torch.Tensor] = field(default_factory=dict)
    upper: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def worst_name(self) -> str | None:
        """Name of ``worst_node`` (TransformerLens-style; an edge's MIB name when ``info["edge_graph"]`` says the graph)."""
        if self.worst_node is None:
            return None
        node_type, index = self.worst_node
        if node_type == EDGE_TYPE:
            graph = self.info.get("edge_graph")
            if graph is None:
                return f"edge {index[0]}"
            from .edges.graph import EdgeGraph

            return EdgeGraph.from_description(graph).edge_names[index[0]]
        return node_name(node_type, index)

    def __str__(self) -> str:
        worst = "" if self.worst_node is None else f" (at {self.worst_name})"
        prob = "" if self.theta is None else f"; P(some unverified |c| >= {self.theta:g}) <= {self.prob_upper:.3g}"
        return (
            f"{self.n_unverified} unverified nodes ({self.direction}): max |c| <= {self.max_effect_upper:.4g} "
            f"with confidence {1 - self.alpha:g}{worst}{prob}. {self.assumption}"
        )


def false_negative_bound(
    model: Any,
    pairs: PromptPairs,
    verified: Verification | list[tuple[str, tuple[int, ...]]],
    *,
    theta: float | None = None,
    samples: int | None = None,
    p: float | None = None,
    alpha: float = 0.05,
    combine: str = "iut",
    seed: int = 0,
    direction: str | None = None,
    nodes: Any = None,
    batch_size: int | None = None,
    memory_gb: float = 1.0,
    progress: bool = False,
    workers: int | None = None,
    ray_address: str | None = None,
    checkpoint: str | None = None,
) -> FalseNegativeBound:
    """Bound the largest effect among the nodes verification did not reach.

    Args:
        model: an ``atpstar.Model`` or a ``transformers`` causal LM.
        pairs: the prompt pairs (c(n) is the mean effect over them).
        verified: a ``Verification`` (from ``atpstar.verify``) or a list of ``(node_type, index)``.
        theta: effect size for the probability bound (b); None leaves ``prob_upper`` nan.
        samples: Subsampling samples per pair (random design; each node in with probability ``p``);
            None: ``DEFAULT_SAMPLES`` (``atpstar.find`` plans them from the nodes left, see ``plan_samples``).
        p: inclusion probability of Subsampling; None: ``choose_p(samples)`` (about 32 samples with each
            node in, at most 0.5).
        alpha: 1 - confidence of the bound (a) and level of the test (b).
        combine: ``"iut"`` (per-node one-sided bounds, valid for the maximum without correction; the
            sharpest, see the module docstring) or ``"bonferroni"`` (the union bound, t_{1-α/(2N)}, and
            ``prob_upper`` = min(1, Σ p_n)).
        seed: Subsampling seed.
        direction: ``"noising"`` or ``"denoising"``; None takes the Verification's, else ``"noising"``.
        nodes: node types the population consists of; None takes ``verified.node_types`` (required when
            ``verified`` is a plain list).
        batch_size, memory_gb: batching of the patched forwards (as Subsampling).
        progress: show a progress bar.
        workers: run the Subsampling on this many Ray workers, in ranges of samples whose statistics
            merge (``pip install 'atpstar[distributed]'``); None: in-process.
        ray_address: None starts a local Ray instance; ``"auto"`` joins a running cluster.
        checkpoint: a folder; each finished range of samples is saved there, and a rerun with the
            same folder, model, pairs and options resumes from them (also in-process).

    Returns:
        ``FalseNegativeBound`` with ``max_effect_upper``, ``prob_upper``, ``assumption``, ``n_unverified``, ``cost``.

    Raises:
        InputError: bad options, missing node types, or verified nodes outside the layout.
    """
    model = as_model(model)
    if not isinstance(pairs, PromptPairs):
        raise InputError(f"pairs must be an atpstar.PromptPairs; got {type(pairs).__name__}")
    if isinstance(verified, Verification):
        node_list = verified.nodes
        node_types = check_node_types(verified.node_types if nodes is None else nodes)
        direction = verified.direction if direction is None else direction
    elif isinstance(verified, (list, tuple)):
        node_list = [(t, tuple(int(i) for i in index)) for t, index in verified]
        if nodes is None:
            raise InputError("verified is a plain list of nodes: pass nodes=[...] with the node types the bound covers")
        node_types = check_node_types(nodes)
    else:
        raise InputError(
            f"verified must be an atpstar Verification or a list of (node_type, index); got {type(verified).__name__}"
        )
    direction = check_direction("noising" if direction is None else direction)
    samples = DEFAULT_SAMPLES if samples is None else samples
    if p is None:  # an invalid ``samples`` is reported by check_options
        p = choose_p(samples) if isinstance(samples, int) and not isinstance(samples, bool) and samples >= 2 else 0.5
    check_options(samples, p, "random", batch_size, memory_gb)
    if combine not in COMBINES:
        raise InputError(f"unknown combine {combine!r}; choose one of {list(COMBINES)}")
    check_number("alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
    if theta is not None:
        check_number("theta", theta, 0.0, None, low_open=True)  # NaN would make every probability bound 1
    edges = EDGE_TYPE in node_types
    if edges and node_types != [EDGE_TYPE]:
        raise InputError("bound edges on their own: nodes=['edge'] in a call of their own")
    layout = _edge_layout(model) if edges else NodeLayout.of(node_types, model.sizes, pairs.seq_len)
    shapes = layout.shapes
    exclude = {t: torch.zeros(shape, dtype=torch.bool) for t, shape in shapes.items()}
    for t, index in node_list:
        if t not in shapes:
            continue  # a verified node outside the bounded population changes nothing
        if len(index) != len(shapes[t]) or any(not 0 <= i < n for i, n in zip(index, shapes[t])):
            raise InputError(
                f"verified node {t} {index} lies outside the layout {shapes[t]} of this model and prompt length"
            )
        exclude[t][index] = True
    check_pairs_fit(model, pairs)
    if isinstance(verified, Verification) and verified.identity is not None:  # another model's verified set
        check_identity(
            verified.identity,
            identity(model, pairs, direction),
            "verification",
            "Bound with the model, tokenizer, prompt pairs and metric it was made with.",
            fields=(*MODEL_FIELDS, "pairs", "metric"),
        )

    cost = Cost()
    from .distributed import executor_for
    from .distributed.sweeps import edge_samples_on, subsample_on

    # Subsampling as ranges of samples on an executor: in-process one range (the loop of a single call),
    # with a checkpoint or on Ray workers several, merged with Welford's update (atpstar.distributed).
    executor = executor_for(model, workers, ray_address, progress)
    sampling = {"samples": samples, "p": p, "seed": seed, "design": "random"}
    if edges:  # random joint patches of edge subsets (atpstar.edges.subsampling)
        stats, _, run_info = edge_samples_on(
            executor, model, pairs, direction, sampling, batch_size, memory_gb, exclude[EDGE_TYPE], checkpoint, cost
        )
    else:
        batch = sample_batch(model, pairs.seq_len, layout.size, memory_gb, batch_size)
        stats, _, run_info = subsample_on(
            executor, model, pairs, node_types, direction, sampling, batch, exclude, checkpoint, cost
        )
    keep = ~layout.flatten(exclude)  # [N]
    n_unverified = int(keep.sum())
    estimate, upper, prob_terms, se = _node_bounds(stats, keep, n_unverified, alpha, theta, combine)

    if n_unverified == 0:
        max_upper, worst = 0.0, None
    else:
        flat_upper = torch.where(keep, upper, torch.full_like(upper, -1.0))
        max_upper = float(flat_upper.max())
        worst = layout.locate(int(flat_upper.argmax()))
    if theta is None:
        prob_upper = float("nan")
    elif n_unverified == 0:
        prob_upper = 0.0
    elif combine == "iut":
        prob_upper = float(prob_terms[keep].max())
    else:
        prob_upper = min(1.0, float(prob_terms[keep].sum()))
    finite_se = se[keep & torch.isfinite(se)]
    return FalseNegativeBound(
        max_effect_upper=max_upper,
        prob_upper=prob_upper,
        theta=theta,
        alpha=alpha,
        n_unverified=n_unverified,
        worst_node=worst,
        assumption=ASSUMPTION,
        cost=cost,
        direction=direction,
        estimate=layout.unflatten(torch.where(keep, estimate, torch.full_like(estimate, float("nan")))),
        upper=layout.unflatten(torch.where(keep, upper, torch.full_like(upper, float("nan")))),
        info={
            "samples": samples,
            "p": p,
            "seed": seed,
            "combine": combine,
            "n_pairs": pairs.n_pairs,
            "n_verified": len(node_list),
            # typical and largest standard error of ĉ(n): what ``plan_samples`` needs for the next bound
            "se_median": float(finite_se.median()) if len(finite_se) else float("nan"),
            "se_max": float(finite_se.max()) if len(finite_se) else float("nan"),
            **({"edge_graph": _edge_graph(model).describe()} if edges else {}),
            **run_info,
        },
    )


def _node_bounds(
    stats: SubsamplingStats, keep: torch.Tensor, n_unverified: int, alpha: float, theta: float | None, combine: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per flat node: ĉ [N], upper bound on |c| [N], p-value of |c| >= theta [N], se [N] (nan: unusable)."""
    n_pairs = stats.values["count_in"].shape[0]
    diff = stats.flat("mean_in") - stats.flat("mean_out")  # [P, N]
    estimate = diff.mean(0)
    variances = torch.cat([stats.flat("var_in"), stats.flat("var_out")])  # [2P, N]
    counts = torch.cat([stats.flat("count_in"), stats.flat("count_out")])  # [2P, N]
    root, df = welch_se_df(variances, counts.clamp(min=1))
    df = torch.where((counts < 2).any(0), torch.full_like(df, float("nan")), df)
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


def _edge_graph(model: Any) -> Any:
    from .edges.graph import graph_of

    return graph_of(model)


def _edge_layout(model: Any) -> NodeLayout:
    """The flat layout of the edge graph: one axis of N edges."""
    return NodeLayout({EDGE_TYPE: (_edge_graph(model).n_edges,)})
