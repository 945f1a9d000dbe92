"""``false_negative_bound``: how large an effect could hide among the nodes verification did not reach (Kramár et al. 2024).

The verb checks its input, builds the sampling job (``Sampling``: the unverified nodes of the population),
hands it to the sampler of the population's node-space engine (``SAMPLERS``: site nodes in-process or as
work units on workers, edges in-process), and combines
the per-node statistics into the bound (``bound.statistics``; the maths is in that module's docstring,
sample planning in ``bound.planning``).

Cost: 2P full forwards and ``samples`` × P patched forwards (as Subsampling).

Shape letters: P pairs, N nodes (all node types, flattened).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..cost import Cost
from ..dictionaries.sampling import bound_sampler
from ..errors import InputError
from ..fingerprint import check_reuse
from ..job import Job
from ..methods.subsampling import SubsamplingStats, check_options, sample_plan
from ..model import Model, as_model
from ..nodes import NodeLayout
from ..pairs import PromptPairs, check_direction
from ..pairsets import as_pairs, check_positions, each_group, merge_info, refuse_workers
from ..spaces import Spaces, check_node_types, spaces_for
from ..validate import check_count, check_number, check_pairs_fit
from ..verify import Verification
from .planning import DEFAULT_SAMPLES, choose_p
from .record import ASSUMPTION, FalseNegativeBound
from .statistics import COMBINES, NodeSums, Summary, node_bounds, summarize

Node = tuple[str, tuple[int, ...]]  # (node type, index in its layout)
Stats = SubsamplingStats | NodeSums  # a sampler's per-pair statistics, or their per-node sums over the pairs


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
        pairs: the prompt pairs (c(n) is the mean effect over them); a ``PairSet`` is sampled group by group
            (node types summed over positions only), its per-pair statistics merged.
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

    Example:
        >>> import atpstar
        >>> model = atpstar.load_model("toy-ioi")
        >>> pairs = atpstar.tasks.ioi(model.tokenizer, 4, seed=0)
        >>> checked = atpstar.verify(model, pairs, atpstar.attribute(model, pairs, "atp+qkfix", nodes=["head"]), budget=10)
        >>> bound = atpstar.false_negative_bound(model, pairs, checked, theta=1.0, samples=256)
        >>> bound.n_unverified, round(bound.max_effect_upper, 3), bound.prob_upper < 0.05
        (110, 1.543, False)
    """
    model = as_model(model)
    pairs = as_pairs(pairs)
    refuse_workers(pairs, workers, ray_address, checkpoint)
    node_list, node_types, direction = _population(verified, nodes, direction)
    samples = DEFAULT_SAMPLES if samples is None else check_count("samples", samples, 2)
    p = choose_p(samples) if p is None else p
    check_options(samples, p, "random", batch_size, memory_gb)
    if combine not in COMBINES:
        raise InputError(f"unknown combine {combine!r}; choose one of {list(COMBINES)}")
    check_number("alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
    if theta is not None:
        check_number("theta", theta, 0.0, None, low_open=True)  # NaN would make every probability bound 1
    engine = {"workers": workers, "ray_address": ray_address, "checkpoint": checkpoint}
    spaces = _spaces(model, node_types, engine)
    check_positions(pairs, {t: spaces.of(t).pos_axis(t) for t in node_types})
    layout = NodeLayout({t: spaces.of(t).shape(t, pairs.seq_len) for t in node_types})
    exclude = _exclusions(layout, node_list)
    check_pairs_fit(model, pairs)
    if isinstance(verified, Verification):  # another model's verified set
        check_reuse(
            verified,
            model,
            pairs,
            "verification",
            "Bound with the model, tokenizer, prompt pairs and metric it was made with.",
        )
    job = Job(model, pairs, direction, Cost(), progress)
    sampling = {"samples": samples, "p": p, "seed": seed, "design": "random"}
    run = Sampling(job, node_types, sampling, batch_size, memory_gb, exclude, engine)
    stats, run_info = _by_group(run, SAMPLERS[spaces.spaces[0].engine])
    keep = ~layout.flatten(exclude)  # [N]
    estimate, upper, prob, se = node_bounds(stats, keep, int(keep.sum()), alpha, theta, combine)
    summary = summarize(keep, upper, prob, se, theta, combine)
    return FalseNegativeBound(
        max_effect_upper=summary.max_upper,
        prob_upper=summary.prob_upper,
        theta=theta,
        alpha=alpha,
        n_unverified=int(keep.sum()),
        worst_node=None if summary.worst is None else layout.locate(summary.worst),
        assumption=ASSUMPTION,
        cost=job.cost,
        direction=direction,
        estimate=layout.unflatten(torch.where(keep, estimate, torch.full_like(estimate, float("nan")))),
        upper=layout.unflatten(torch.where(keep, upper, torch.full_like(upper, float("nan")))),
        se=layout.unflatten(torch.where(keep, se, torch.full_like(se, float("nan")))),
        info={
            **_sampling_info(sampling, combine, pairs.n_pairs, len(node_list), summary),
            **run_info,
        },
    )


def _sampling_info(
    sampling: dict[str, Any], combine: str, n_pairs: int, n_verified: int, summary: Summary
) -> dict[str, Any]:
    """The facts a bound records about its sampling (``info``)."""
    return {
        "samples": sampling["samples"],
        "p": sampling["p"],
        "seed": sampling["seed"],
        "combine": combine,
        "n_pairs": n_pairs,
        "n_verified": n_verified,
        "se_median": summary.se_median,
        "se_max": summary.se_max,
    }


def _population(verified: Any, nodes: Any, direction: str | None) -> tuple[list[Node], list[str], str]:
    """(verified nodes, node types of the population, direction) from ``verified`` and the arguments."""
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
    return node_list, node_types, check_direction("noising" if direction is None else direction)


def _spaces(model: Model, node_types: list[str], engine: dict[str, Any]) -> Spaces:
    """The node spaces of the population, bound to ``model``. Every engine's Subsampling runs anywhere (in-process,
    with a checkpoint folder, on workers); other engines than sites (edges) sample their nodes on their own."""
    spaces = Spaces(spaces_for(model, node_types))
    engines = {space.engine for space in spaces}
    if engines - set(SAMPLERS):
        raise InputError(f"no false-negative bound for the nodes {node_types}: their engines {engines} cannot sample")
    if engines != {"sites"} and len(spaces.spaces) > 1:
        alone = sorted({space.kind for space in spaces if space.engine != "sites"})
        raise InputError(
            f"bound {'/'.join(alone)} nodes on their own: only their node types in nodes=, in a call of their own"
        )
    return spaces


def _exclusions(layout: NodeLayout, node_list: list[Node]) -> dict[str, torch.Tensor]:
    """Node type -> [*layout] bool: the verified nodes, which the Subsampling never patches."""
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
    return exclude


@dataclass
class Sampling:
    """One bound's Subsampling job: which nodes, how many samples, how batched, and where it runs."""

    job: Job  # model, pairs, direction, the pass counter and progress
    node_types: list[str]
    options: dict[str, Any]  # samples, p, seed, design
    batch_size: int | None
    memory_gb: float
    exclude: dict[str, torch.Tensor]  # node type -> [*layout] bool: the verified nodes, never patched
    engine: dict[str, Any]  # workers, ray_address, checkpoint (all None: in-process)


def _sample_sites(run: Sampling) -> tuple[Stats, dict[str, Any]]:
    """Subsampling of site nodes: (statistics, facts of the run), in-process or as work units over ranges of
    samples (``atpstar.distributed``; also in-process with a checkpoint folder)."""
    from ..distributed.sweeps import subsample_on

    job, engine = run.job, run.engine
    block, batch = sample_plan(job.model, job.pairs, run.node_types, run.memory_gb, run.batch_size, 0)
    where = (batch, run.exclude, engine["checkpoint"], job.cost, block, NodeSums.of)
    stats, _, run_info = subsample_on(
        _executor(run), job.model, job.pairs, run.node_types, job.direction, run.options, *where
    )
    return stats, run_info


def _sample_edges(run: Sampling) -> tuple[SubsamplingStats, dict[str, Any]]:
    """Random joint patches of edge subsets (``sweeps.edges``) as ranges of samples; the facts name the graph."""
    from ..distributed.sweeps import edge_samples_on
    from ..edges.graph import graph_of

    job = run.job
    options = {k: run.options[k] for k in ("samples", "p", "seed")}
    (edge_type,) = run.node_types
    where = (run.batch_size, run.memory_gb, run.exclude[edge_type], run.engine["checkpoint"], job.cost)
    stats, _, run_info = edge_samples_on(_executor(run), job.model, job.pairs, job.direction, options, *where)
    return stats, {**run_info, "edge_graph": graph_of(job.model).describe()}


def _by_group(
    run: Sampling, sampler: Callable[[Sampling], tuple[Stats, dict[str, Any]]]
) -> tuple[Stats, dict[str, Any]]:
    """``sampler`` once per equal-length group of the pairs, per-pair statistics merged in example order."""
    parts = each_group(run.job, lambda group_job: sampler(replace(run, job=group_job)))
    if len(parts) == 1:
        return parts[0]
    pairs = run.job.pairs
    info = merge_info(pairs, [info for _, info in parts])
    if any(isinstance(stats, NodeSums) for stats, _ in parts):  # per-node sums over each group's pairs add up
        sums = [NodeSums.of(s) if isinstance(s, SubsamplingStats) else s for s, _ in parts]
        return sum(sums[1:], sums[0]), info
    groups = [stats for stats, _ in parts if isinstance(stats, SubsamplingStats)]
    values = {k: pairs.gather([stats.values[k] for stats in groups]) for k in groups[0].values}  # [P, N]
    return SubsamplingStats(groups[0].shapes, values), info


def _executor(run: Sampling) -> Any:
    """Where the Subsampling's ranges of samples run: in-process (one range, the loop of a single call; with a
    checkpoint folder several) or on Ray workers (``atpstar.distributed``)."""
    from ..distributed import executor_for

    return executor_for(run.job.model, run.engine["workers"], run.engine["ray_address"], run.job.progress)


# The Subsampling of each node-space engine (``NodeSpace.engine``).
SAMPLERS: dict[str, Callable[[Sampling], tuple[Stats, dict[str, Any]]]] = {
    "sites": _sample_sites,
    "edges": _sample_edges,
    "latents": bound_sampler,  # dictionary latents (``atpstar.dictionaries.sampling``)
}
