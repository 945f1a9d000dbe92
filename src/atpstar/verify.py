"""Verification: exact activation patching of nodes in the order an estimate ranks them (Kramár et al. 2024).

Estimators are pre-filters: ``verify`` takes their ranking (largest ``|score|`` first, across the
estimate's node types) and patches the nodes one by one, exactly, on every pair, until ``budget``
nodes are verified or the estimate's score falls below ``threshold``. Both stopping rules depend only
on the estimate, so the verified set is known up front; each node space patches its share of the
nodes (``NodeSpace.exact_effects``: site nodes batched by layer, edges by receiver layer) and the
result lists nodes in estimate order.
Cost: 2P full forwards (base and source runs) per node space, then one forward per verified node and
pair started at the node's layer, counted (L - l) / L.

Shape letters: P pairs, N verified nodes.
"""

from __future__ import annotations

from typing import Any

import torch

from .batching import HEADROOM, Footprint, pairs_per_block, plan_batch
from .cost import Cost
from .errors import InputError
from .fingerprint import check_reuse, identity
from .job import Job
from .model import as_model
from .nodes import NodeLayout
from .pairs import PromptPairs, check_direction
from .pairsets import as_pairs, check_positions, each_group, refuse_workers
from .progress import progress_bar
from .result import Attribution
from .spaces import NodeSpace, Spaces, spaces_for
from .validate import batch_for_memory, check_batch_size, check_count, check_memory_gb, check_number, check_pairs_fit
from .verification import Verification

__all__ = ["Verification", "patch_nodes", "ranked_nodes", "verify"]


def verify(
    model: Any,
    pairs: PromptPairs,
    estimate: Attribution,
    budget: int | None = None,
    threshold: float | None = None,
    direction: str | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    checkpoint: str | None = None,
    memory_gb: float = 1.0,
) -> Verification:
    """Patch nodes exactly, one at a time, in the order of ``estimate`` (largest ``|score|`` first).

    Args:
        model: an ``atpstar.Model`` or a ``transformers`` causal LM.
        pairs: the prompt pairs to verify on (their layout must match the estimate's); a ``PairSet`` is
            verified group by group (node types summed over positions only), effects in example order.
        estimate: any ``Attribution`` (nodes of any space, edges included); its ``scores`` give the order.
        budget: verify at most this many nodes; None: no limit.
        threshold: verify only nodes with ``|score| >= threshold``; None: no limit. With neither, every
            node of the estimate is verified (exhaustive patching in estimate order).
        direction: ``"noising"`` or ``"denoising"``; None takes ``estimate.direction``.
        batch_size: patched forwards per batch; None fits ``memory_gb``.
        progress: show a progress bar.
        workers: verify on this many Ray workers, in windows of ranks (``pip install
            'atpstar[distributed]'``); None: in-process.
        ray_address: None starts a local Ray instance; ``"auto"`` joins a running cluster.
        checkpoint: a folder; each finished window of ranks is saved there, and a rerun with the same
            folder, model, pairs and estimate resumes from them (also in-process).
        memory_gb: memory for one batch of patched forwards, in GiB, when ``batch_size`` is None.

    Returns:
        ``Verification`` with ``nodes``, ``effects`` [N, P], ``mean_effects``, ``names``, ``cost``.

    Raises:
        InputError: bad estimate, budget, threshold, direction or batch size.
        IdentityMismatchError: the estimate was made on another model, tokenizer, pairs or metric.

    Example:
        >>> import atpstar
        >>> model = atpstar.load_model("toy-ioi")
        >>> pairs = atpstar.tasks.ioi(model.tokenizer, 4, seed=0)
        >>> estimate = atpstar.attribute(model, pairs, method="atp+qkfix", nodes=["head"])
        >>> checked = atpstar.verify(model, pairs, estimate, budget=3)
        >>> checked.names
        ['blocks.1.attn.hook_z[pos 14, head 1]', 'blocks.0.attn.hook_z[pos 14, head 3]', 'blocks.1.attn.hook_z[pos 14, head 2]']
        >>> checked.mean_effects
        tensor([-5.5727, -0.6310, -3.9442], dtype=torch.float64)
    """
    model = as_model(model)
    if not isinstance(estimate, Attribution):
        raise InputError(f"estimate must be an atpstar.Attribution (from attribute); got {type(estimate).__name__}")
    pairs = as_pairs(pairs)
    refuse_workers(pairs, workers, ray_address, checkpoint)
    direction = check_direction(estimate.direction if direction is None else direction)
    budget = None if budget is None else check_count("budget", budget, minimum=0)
    threshold = None if threshold is None else check_number("threshold", threshold, 0.0)
    batch_size = check_batch_size(batch_size)
    memory_gb = check_memory_gb(memory_gb)
    spaces = check_estimate(model, pairs, estimate)
    current = identity(
        model, pairs, direction, estimate.node_types, "verify", {"budget": budget, "threshold": threshold}
    )
    check_reuse(
        estimate,
        model,
        pairs,
        f"estimate ({estimate.method})",
        "Verify with the model, tokenizer, prompt pairs and metric the estimate was made with.",
    )
    nodes, ranked_scores, n_nodes = ranked_nodes(estimate, budget, threshold)
    job = Job(model, pairs, direction, Cost(), progress)
    effects, base_metric, info = patch_nodes(
        job, spaces, nodes, batch_size, memory_gb, workers=workers, ray_address=ray_address, checkpoint=checkpoint
    )
    return Verification(
        nodes=nodes,
        effects=effects,
        estimate_scores=ranked_scores,
        node_types=list(estimate.node_types),
        direction=direction,
        metric=pairs.metric_name,
        model_id=model.model_id,
        cost=job.cost,
        base_metric=base_metric.detach().double().cpu(),
        info={
            "estimate_method": estimate.method,
            "budget": budget,
            "threshold": threshold,
            "n_nodes": n_nodes,
            **info,
            **{k: v for k, v in estimate.info.items() if k in ("edge_graph", "spaces")},
            "identity": current,
            "estimate_identity": estimate.identity,
        },
    )


def check_estimate(model: Any, pairs: PromptPairs, estimate: Attribution) -> Spaces:
    """The estimate's node spaces on ``model``, after checking the model and the estimate's layouts fit."""
    spaces = Spaces(spaces_for(model, estimate.node_types, estimate.options))
    check_positions(pairs, {t: space.pos_axis(t) for space in spaces for t in space.node_types})
    for space in spaces:
        space.check_model(model)
        for t in space.node_types:
            space.check_layout(t, estimate.scores[t], pairs.seq_len)
    check_pairs_fit(model, pairs)
    return spaces


def ranked_nodes(
    estimate: Attribution, budget: int | None, threshold: float | None
) -> tuple[list[tuple[str, tuple[int, ...]]], torch.Tensor, int]:
    """The nodes to verify, in estimate order: ([(node type, index)], their scores [n] float64, N of all nodes)."""
    types, type_index, flat_index = estimate.order()
    layout = NodeLayout.like(estimate.scores, types)
    flat_scores = layout.flatten({t: estimate.scores[t].double() for t in types})  # [N] in layout order
    ranked_scores = flat_scores[layout.position(type_index, flat_index)]  # [N] in estimate order
    n_verify = len(ranked_scores)
    if threshold is not None:
        n_verify = int((ranked_scores.abs() >= threshold).sum())  # sorted by |score|: a prefix
    if budget is not None:
        n_verify = min(n_verify, budget)
    nodes = [layout.locate(int(p)) for p in layout.position(type_index[:n_verify], flat_index[:n_verify])]
    return nodes, ranked_scores[:n_verify].clone(), int(len(ranked_scores))


def patch_nodes(
    job: Job,
    spaces: Spaces,
    nodes: list[tuple[str, tuple[int, ...]]],
    batch_size: int | None = None,
    memory_gb: float = 1.0,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    checkpoint: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Exact effects of patching each listed node alone: ([n, P] float64 in list order, base metric [P], info).

    Each space patches its own nodes (``NodeSpace.exact_effects``); the batch comes from ``batch_size``
    or, when None, from ``memory_gb`` and the space's per-element footprint.
    """
    effects = torch.zeros(len(nodes), job.n_pairs, dtype=torch.float64)
    base_metric = torch.zeros(job.n_pairs, dtype=torch.float64)
    info: dict[str, Any] = {}
    with progress_bar(len(nodes) * job.n_pairs, "verify", job.progress) as bar:
        for space in spaces:
            rows = torch.tensor([i for i, (t, _) in enumerate(nodes) if t in space.node_types], dtype=torch.long)
            mine = [nodes[i] for i in rows.tolist()]
            if workers is None and ray_address is None and checkpoint is None:
                parts = each_group(
                    job, lambda group: _in_pair_blocks(group, space, mine, batch_size, memory_gb, bar.update)
                )
                effects[rows] = job.pairs.gather([p[0] for p in parts], dim=1)  # [n, P]
                base_metric = job.pairs.gather([p[1] for p in parts])  # [P]
            else:
                batch = batch_for_memory(batch_size, memory_gb, space.element_bytes(job))
                part, base_metric, info = _on_workers(job, space, mine, batch, workers, ray_address, checkpoint)
                effects[rows] = part
    return effects, base_metric, info


def plan_pair_blocks(
    job: Job, space: NodeSpace, batch_size: int | None, memory_gb: float, what: str
) -> tuple[int, int]:
    """(pairs per block, patched forwards per batch) of exact patching of ``space``'s nodes in ``memory_gb``:
    ``HEADROOM`` is kept free; blocks whose prepared runs fit half of the rest, batches in what the block leaves."""
    per_pair = space.pair_bytes(job)
    held = HEADROOM * memory_gb * 2**30  # what no estimate sees
    fix = "Raise memory_gb or use shorter prompts"
    block = pairs_per_block(job.n_pairs, per_pair, memory_gb, what, fix, held=held)
    footprint = Footprint(space.element_bytes(job), held=held + block * per_pair)
    return block, plan_batch(footprint, memory_gb, batch_size=batch_size)



def _in_pair_blocks(
    job: Job,
    space: NodeSpace,
    nodes: list[tuple[str, tuple[int, ...]]],
    batch_size: int | None,
    memory_gb: float,
    advance: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``space.exact_effects`` over blocks of pairs whose prepared runs fit half of ``memory_gb`` (each
    (node, pair) effect is independent of the other pairs, so blocks only bound the memory):
    (effects [n, P], base metric [P])."""
    block, batch = plan_pair_blocks(job, space, batch_size, memory_gb, "verify")
    if block == job.n_pairs:
        return space.exact_effects(job, nodes, batch, advance)
    effects = torch.zeros(len(nodes), job.n_pairs, dtype=torch.float64)
    base_metric = torch.zeros(job.n_pairs, dtype=torch.float64)
    for start in range(0, job.n_pairs, block):
        pairs = slice(start, min(start + block, job.n_pairs))
        part_job = job.with_pairs(job.pairs.subset(range(pairs.start, pairs.stop)))
        effects[:, pairs], base_metric[pairs] = space.exact_effects(part_job, nodes, batch, advance)
    return effects, base_metric


def _on_workers(
    job: Job,
    space: NodeSpace,
    nodes: list[tuple[str, tuple[int, ...]]],
    batch: int,
    workers: int | None,
    ray_address: str | None,
    checkpoint: str | None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``exact_effects`` as rank windows on an executor (Ray workers, or in-process with a checkpoint folder)."""
    from .distributed import executor_for
    from .distributed.verify_units import verify_on

    ranked = getattr(space, "ranked_index", None)
    if ranked is None:
        raise InputError(
            f"{space.kind} nodes are verified in-process; drop workers=/ray_address=/checkpoint= for them"
        )
    executor = executor_for(job.model, workers, ray_address, job.progress)
    types = list(space.node_types)
    return verify_on(executor, job.model, job.pairs, types, job.direction, ranked(nodes), batch, checkpoint, job.cost)  # type: ignore[no-any-return]
