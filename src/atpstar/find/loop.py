"""Certified localization: ``find`` closes the loop from an estimate to a guarantee.

Goal: every node with |c(n)| >= θ (c = exact mean effect over the pairs), verified by exact patching,
and a certificate that no unverified node is that large. The loop:

1. Estimate: one estimator (AtP* by default) ranks every node.
2. Verify in estimate order, in windows of ``patience`` nodes, while the windows pay for themselves: a
   verified node leaves the bound's population, and the first bound's planned samples (``plan_samples``:
   SAFETY q² V / (θ² P), V = mean_j Σ c_j(n)² over the unverified nodes, from the estimate) fall; a window
   pays when that saves more than the window costs. Stop after the first window that did not pay and found
   no node with |c| >= θ, or that saved nothing (the plan is at its floor, ``PLAN_MIN_SAMPLES``: from there
   the bound is cheaper than verifying further, and it flags the large nodes left).
3. Bound round r: Subsampling over the unverified nodes (fresh seed), at level α_r / 2 (α_r = α / 2^r),
   ``samples`` planned from the nodes left, p = ``choose_p(samples)`` or lower where the interaction
   measured so far asks for it. When max_n U(n) < θ, calibrate (``find.calibrate``, at α_r / 2): patch
   the bound's top and stratified random nodes exactly, widen the bound by the measured shrinkage;
   certified only when calibration passes.
4. Otherwise verify the nodes the bound cannot rule out (U(n) >= θ), in decreasing order of that
   bound's own |ĉ(n)|. When all of them were verified, the same bound lies below θ on every node left:
   calibrate it in the same round (its intervals were not used to certify yet). Else go to 3 with samples
   re-planned from the measured standard errors.
Stops when certified, or when the user's ``budget`` is spent (not certified; the result says what is left).
Bound rounds and their calibrations are gambles: one runs only while, should it fail, verifying every node left
still keeps the total within the estimate + (1 + ``max_overspend``) x exhaustive patching (``Search.slack``; a
further verification call's 2P base and source runs count against the same slack). When verifying every
remaining node costs no more than the next bound and its calibration, when no bound fits the slack any more, or
after ``max_rounds`` rounds, they are all verified instead: certified by exhaustion (exact, no assumption). So
without a budget ``find`` always ends certified. When the estimate and one calibrated bound of ``MIN_SAMPLES``
samples would cost as much as exhaustive patching, every node is patched in one call at
``activation_patching``'s cost (``fallback`` says why). Design records 0021 and 0026.

Why α / 2^r: each round is a new chance to certify wrongly. Given the history, round r certifies
while some unverified node n0 has |c(n0)| >= θ with probability <= α_r (its fresh samples put
U(n0) < θ with at most α_r / 2, the shrinkage bound fails with at most α_r / 2), so over all rounds the
error is <= Σ α / 2^r < α, assuming unchecked nodes shrink no more than the checked ones.

Cost: the estimator's, plus (per verify call) 2P forwards and one forward per node and pair started
at the node's layer, plus per bound 2P + samples × P forwards and its calibration's verify call.
``budget`` caps the total; an estimate that alone costs more is refused before any pass.

Shape letters: P pairs, N nodes (all node types, flattened in ``check_node_types`` order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..api import attribute
from ..cost import Cost
from ..errors import InputError
from ..fingerprint import check_reuse
from ..job import Job
from ..methods import METHODS, build_method
from ..model import Model, as_model
from ..nodes import NodeLayout
from ..pairs import PromptPairs
from ..pairsets import as_pairs, check_positions, refuse_workers
from ..result import Attribution
from ..spaces import Spaces, check_node_types, spaces_for
from ..validate import check_pairs_fit
from .assemble import localization
from .engines import engine_facts
from .journal import CHECKPOINT_NAME, FindJournal, digest, find_identity
from .localization import Localization
from .options import FindOptions, check_options
from .plan import fallback_planned, fallback_reason
from .stages import Outcome, bound_rounds, exhaustive_fallback, verify_in_estimate_order
from .state import Search, population


def find(
    model: Any,
    pairs: PromptPairs,
    theta: float,
    *,
    nodes: Any,
    estimator: str | Attribution = "atp*",
    alpha: float = 0.05,
    budget: float | None = None,
    max_overspend: float = 0.1,
    direction: str = "noising",
    progress: bool = False,
    patience: int | None = None,
    max_rounds: int = 6,
    seed: int = 0,
    estimator_options: dict[str, Any] | None = None,
    batch_size: int | None = None,
    memory_gb: float = 1.0,
    workers: int | None = None,
    ray_address: str | None = None,
    checkpoint: str | Path | None = None,
    out_dir: str | Path | None = None,
    recompute: bool = False,
) -> Localization:
    """Find every node with |c(n)| >= ``theta`` and certify that no other node is that large.

    Args:
        model: an ``atpstar.Model`` or a ``transformers`` causal LM.
        pairs: the prompt pairs; c(n) is the exact effect of patching n alone, averaged over them. A
            ``PairSet`` (prompts of several lengths) takes ``nodes=["edge"]``: every stage runs group by group.
        theta: the effect size sought (in metric units, e.g. logit difference), > 0.
        nodes: node types to search (``neuron``, ``query``, ``key``, ``value``, ``head``), or ``["edge"]``
            alone for the edges of the MIB/EAP-IG graph (estimated by the edge estimators, verified by exact
            edge patching, bounded by random joint patches of edge subsets; in-process only).
        estimator: a method id from ``atpstar.METHODS`` (default ``"atp*"``), or an ``Attribution``
            already computed on these pairs (its cost is counted as the estimate stage).
        alpha: error rate of the certificate (it is wrong with probability <= alpha, under its assumption).
        budget: cap on the total cost in forward equivalents, estimate included; None: no cap. A hard ceiling:
            a search it cuts short ends not certified and says so.
        max_overspend: how much a failed bound may cost beyond exhaustive patching, as a fraction of it (default
            0.1). Bound rounds and their calibration are gambles: one runs only while, should it fail, verifying
            every node left still keeps the total within the estimate + (1 + max_overspend) x exhaustive
            patching; when no bound fits, the rest is verified exactly (certified by exhaustion). So without a
            ``budget`` the search always ends certified and never costs more than that. 0: patch exhaustively
            unless a bound is certain to be cheaper (it never is).
        direction: ``"noising"`` (default) or ``"denoising"``.
        progress: progress bars and one line per round on stderr.
        patience: window of the estimate-order stage (stops after a window with no |c| >= theta);
            None: max(16, N / 200) for N nodes.
        max_rounds: bound rounds at most.
        seed: seed of the bounds' Subsampling (round r uses seed + r).
        estimator_options: options of the estimator method.
        batch_size, memory_gb: batching of the exact and joint patches.
        workers, ray_address: run verification and the bounds' Subsampling on Ray workers (as
            ``atpstar.verify`` and ``atpstar.false_negative_bound``); None: in-process.
        checkpoint: a file where each completed step is saved; a rerun of the same computation resumes
            after the last one (``atpstar.find.journal``); another computation's file is refused, a corrupt
            one reported and ignored. None: nothing is saved (unless ``out_dir``).
        out_dir: a folder: the checkpoint goes to ``out_dir/find.ckpt.safetensors`` and the result to
            ``out_dir/localization.json``/``.safetensors`` when the loop ends.
        recompute: discard the checkpoint and start afresh.

    Returns:
        ``Localization``: ``nodes``, ``effects``, ``verified``, ``bound``, ``certified``, ``cost`` per stage,
        ``history``, ``certificate()``, ``save``/``load``.

    Raises:
        InputError: bad theta, alpha, budget, node types, estimator or options, or an estimate that alone
            costs more than ``budget`` (all before any forward pass).

    Example:
        >>> import atpstar
        >>> model = atpstar.load_model("toy-ioi")
        >>> pairs = atpstar.tasks.ioi(model.tokenizer, 4, seed=0).subset([0])
        >>> found = atpstar.find(model, pairs, 1.0, nodes=["head"])
        >>> found.certified, found.names[:3]
        (True, ['blocks.0.attn.hook_z[pos 14, head 3]', 'blocks.1.attn.hook_z[pos 14, head 0]', 'blocks.1.attn.hook_z[pos 14, head 1]'])
    """
    model = as_model(model)
    pairs = as_pairs(pairs)
    refuse_workers(pairs, workers, ray_address)
    options = check_options(
        theta=theta,
        alpha=alpha,
        budget=budget,
        max_overspend=max_overspend,
        direction=direction,
        progress=progress,
        patience=patience,
        max_rounds=max_rounds,
        seed=seed,
        estimator_options=estimator_options,
        batch_size=batch_size,
        memory_gb=memory_gb,
        workers=workers,
        ray_address=ray_address,
        checkpoint=checkpoint,
        out_dir=out_dir,
        recompute=recompute,
    )
    node_types = check_node_types(nodes)
    spaces = Spaces(spaces_for(model, node_types))
    check_positions(pairs, {t: space.pos_axis(t) for space in spaces for t in space.node_types})
    facts = engine_facts(spaces, options.engine)
    shapes, weight = population(model, spaces, node_types, pairs.seq_len, facts)  # weight: [N]
    given = _estimate_or_check(model, pairs, estimator, node_types, shapes, options.direction)
    check_pairs_fit(model, pairs)
    window = options.window(len(weight))
    estimate_cost = _check_budget(model, pairs, estimator if given is None else given, node_types, weight, options)
    journal = _open_journal(model, pairs, node_types, estimator if given is None else given, window, options)
    say = _say if progress else (lambda message: None)
    if journal.saved_steps:
        say(f"resuming from {journal.path}: {journal.saved_steps} completed steps")
    job = Job(model, pairs, options.direction, Cost(), options.progress)  # costs are counted per stage
    search = Search(job, node_types, shapes, weight, options, journal, spaces, facts)
    outcome = Outcome(not_ruled_out=torch.zeros(len(weight), dtype=torch.bool))
    fallback = fallback_reason(search, 0.0 if given is not None else estimate_cost)
    if fallback and given is None:
        estimate_method = str(estimator)  # never run: exhaustive patching needs no ranking
        exhaustive_fallback(search, outcome, options, fallback, say)
    else:
        per_pair, estimate_method = _estimate(search, estimator if given is None else given, options)  # [P, N]
        search.ceiling = search.spent + (1.0 + options.max_overspend) * search.rest_cost
        fallback = fallback or fallback_planned(search, per_pair, window, options)
        if fallback:
            exhaustive_fallback(search, outcome, options, fallback, say)
        else:
            verify_in_estimate_order(search, outcome, per_pair, window, options, say)
            bound_rounds(search, outcome, per_pair, options, say)
    found = localization(search, outcome, estimate_method, options, _recorded(options, window, journal))
    if out_dir is not None:
        found.save(Path(out_dir) / "localization")
    return found


def _estimate_or_check(
    model: Model,
    pairs: PromptPairs,
    estimator: Any,
    node_types: list[str],
    shapes: dict[str, tuple[int, ...]],
    direction: str,
) -> Attribution | None:
    """The given ``Attribution`` after checking it fits, or None for a method id (checked here)."""
    if isinstance(estimator, Attribution):
        missing = [t for t in node_types if t not in estimator.scores]
        if missing:
            raise InputError(f"the estimate has no scores for node types {missing}; estimate them or drop them")
        for t in node_types:
            want = shapes[t]
            if tuple(estimator.scores[t].shape) != want or estimator.per_pair[t].shape[0] != pairs.n_pairs:
                raise InputError(
                    f"the estimate's {t!r} scores have shape {tuple(estimator.scores[t].shape)} over "
                    f"{estimator.per_pair[t].shape[0]} pairs; these pairs need {want} over {pairs.n_pairs}"
                )
        if estimator.direction != direction:
            raise InputError(f"the estimate is {estimator.direction}; call find with direction={estimator.direction!r}")
        fix = "Search with the model, tokenizer, prompt pairs and metric the estimate was made with."
        check_reuse(estimator, model, pairs, f"estimate ({estimator.method})", fix)
        return estimator
    if not isinstance(estimator, str) or estimator not in METHODS:
        raise InputError(f"unknown estimator {estimator!r}; choose a method id from: {', '.join(METHODS)}")
    return None


def _check_budget(
    model: Model,
    pairs: PromptPairs,
    estimator: str | Attribution,
    node_types: list[str],
    weight: torch.Tensor,
    options: FindOptions,
) -> float | None:
    """Before any pass: the estimate stage's cost (``_estimate_cost``), checked against the budget.

    Raises:
        InputError: the estimate alone costs more than ``budget`` and exhaustive patching does not fit it either
            (the loop would overspend before anything else ran).
    """
    budget = options.budget
    exhaustive = pairs.n_pairs * (2.0 + float(weight.sum()))  # [N] -> activation patching's cost
    estimate = _estimate_cost(model, pairs, estimator, node_types, options)
    if budget is not None and estimate is not None and estimate > budget and exhaustive > budget:
        name = estimator.method if isinstance(estimator, Attribution) else estimator
        raise InputError(
            f"the {name} estimate alone costs {estimate:g} forward equivalents, over budget={budget:g}: a budget "
            f"is a ceiling. Pass budget >= {estimate:g} (that much buys only the estimate; verifying and bounding "
            f"need more, and exhaustive patching of every node costs {exhaustive:g}), a cheaper estimator, or no budget"
        )
    return estimate


def _estimate_cost(
    model: Model, pairs: PromptPairs, estimator: str | Attribution, node_types: list[str], options: FindOptions
) -> float | None:
    """Forward equivalents the estimate stage adds: a given estimate's own cost, else the method's documented
    ``expected_cost``; None when the method counts it only as it runs (or bounds it from above)."""
    if isinstance(estimator, Attribution):
        return estimator.cost.forward_equivalents
    method = build_method(estimator, **(options.estimator_options or {}))
    if method.cost_is_bound:
        return None
    try:
        return method.expected_cost(model, pairs, node_types, {}).forward_equivalents
    except (KeyError, NotImplementedError):
        return None


def _open_journal(
    model: Model,
    pairs: PromptPairs,
    node_types: list[str],
    estimator: str | Attribution,
    window: int,
    options: FindOptions,
) -> FindJournal:
    """The call's journal (``find.journal``): its identity names the estimator, or a digest of a given estimate."""
    if isinstance(estimator, Attribution):
        named = f"{estimator.method}#{digest(_flat(estimator.scores, node_types))}"
    else:
        named = estimator
    current = find_identity(
        model,
        pairs,
        options.direction,
        node_types,
        options.theta,
        options.alpha,
        named,
        {"seed": options.seed, "patience": window, "estimator_options": options.estimator_options or {}},
    )
    return FindJournal.open(options.checkpoint_path(CHECKPOINT_NAME), current, options.recompute)


def _estimate(search: Search, estimator: str | Attribution, options: FindOptions) -> tuple[torch.Tensor, str]:
    """The estimate stage: ([P, N] per-pair scores, method id), run (or replayed) or taken from a given one."""
    node_types = search.node_types
    if isinstance(estimator, Attribution):
        search.use_estimate(_flat(estimator.scores, node_types), estimator.cost)  # [N]
        per_pair = search.layout.flatten({t: _dense(estimator.per_pair[t]) for t in node_types})  # [P, N]
        return per_pair, estimator.method
    method_options = options.estimator_options or {}
    # The estimate keeps to find's memory budget unless its own options say otherwise (batching only).
    budget = {"memory_gb": options.memory_gb} if "memory_gb" in METHODS[estimator].cls.option_names() else {}

    def compute() -> Attribution:
        job = search.job
        run_options = {**budget, **method_options}
        return attribute(job.model, job.pairs, estimator, node_types, direction=job.direction,
                         progress=job.progress, **run_options)  # fmt: skip

    return search.estimate(estimator, method_options, compute)


def _recorded(options: FindOptions, window: int, journal: FindJournal) -> dict[str, Any]:
    """The options a ``Localization`` records in ``info``, and what a resumed call took from its checkpoint."""
    info: dict[str, Any] = {
        "patience": window,
        "max_rounds": options.max_rounds,
        "seed": options.seed,
        "budget": options.budget,
        "max_overspend": options.max_overspend,
        "estimator_options": options.estimator_options or {},
    }
    if journal.replayed:
        info["resumed"] = {"checkpoint": str(journal.path), "steps": journal.replayed, "cost_fe": journal.replayed_cost}
    return info


def _dense(per_pair: torch.Tensor) -> torch.Tensor:
    """[P, *layout] float64 per-pair scores; a ``keep="top"``/``"disk"`` result's sparse ones with 0 where not kept.

    Only the first bound round's guess at V reads them (the ranking uses the result's exact ``scores``);
    the dropped values are each pair's smallest, so the guess is a little low and the round may plan
    fewer samples: the certificate does not depend on it, and later rounds use the measured V.
    """
    return per_pair.to_dense().double() if per_pair.is_sparse else per_pair.double()


def _flat(scores: dict[str, torch.Tensor], node_types: list[str]) -> torch.Tensor:
    """[N] float64 scores of every node type, on the flat node axis."""
    return NodeLayout.like(scores, node_types).flatten({t: scores[t].double() for t in node_types})


def _say(message: str) -> None:
    tqdm.write(f"[find] {message}")
