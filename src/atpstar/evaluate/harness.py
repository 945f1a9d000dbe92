"""Cost of verified recall: how much an estimator plus verification costs to find the true top-K (Kramár et al. 2024).

An estimator ranks the nodes; nodes are then verified by exact patching in that order. The cost of
verified recall at K is the estimator's own cost plus the cost of the verifications until every one
of the true top-K nodes (by |effect| from exhaustive patching) has been verified, both in one unit:
forward passes over single prompts (forward-pass equivalents, one backward = 2 forwards).

Verifying a node means patching it on every prompt pair of the ranking problem, one patched forward
per pair. So in the ``"distribution"`` setting (ranking by the mean over P pairs) one verification
costs P forwards and the estimator is charged its whole cost over the P pairs; in the
``"per_pair"`` setting (one pair alone) a verification costs 1 forward and the estimator is charged
its cost / P. (Equivalently the distribution setting could be stated per pair, own cost / P plus 1 per
verification: every cost would be divided by P and no ranking or ratio would change.) An oracle
ordering costs K verifications: K x P forwards (distribution) or K (per pair).

``verification="partial"`` counts each patched forward at the engine's real cost instead, (L - l) / L
of a forward for a node at layer l (the patched run starts at the node's layer); the oracle is then
charged the same way.

Edges (``nodes=["edge"]``, ``atpstar.edges``) are ranked like any node type: the truth is exact edge
patching (``activation_patching`` with edges), a verification patches one edge (one forward per pair;
partial: ``EdgeGraph.patch_share``, from the receiver's layer), and position-resolved edges
(``edge_positions=True``) are verified one (edge, position) at a time.

Vectorised: with ``rank[n]`` the position of node n in the estimator's order and ``true_order`` the
nodes by decreasing true |effect|, ``cost(K) = own + max(rank[true_order[:K]]) + 1`` is a cumulative
maximum, and recall@K (true top-K inside the estimated top-K) counts the i < K with
``rank[true_order[i]] < K``, a cumulative histogram of ``max(i, rank[true_order[i]])``.

Ties in the estimate keep the stable layout order, as ``Attribution.order`` does.

Two settings:

- ``"distribution"``: ranks by the aggregate ``scores`` of truth and estimate.
- ``"per_pair"``: each pair alone (the paper's single-prompt-pair setting), ranked by that pair's
  ``|per_pair|``; the method's own cost per pair is its total cost / P. Curves are summarised by the
  geometric mean over pairs, with min, max and quartiles.

Shape letters: P pairs, N nodes (all selected node types, flattened), K ranks 1..K_max.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import IdentityMismatchError, InputError
from ..fingerprint import BOOKKEEPING_OPTIONS, MODEL_FIELDS, PAIR_FIELDS, differences
from ..methods.base import METHODS
from ..nodes import NodeLayout
from ..result import Attribution
from ..spaces import Spaces, check_node_types, spaces_from_info
from .record import Evaluation, MethodCurve

SETTINGS: tuple[str, ...] = ("distribution", "per_pair")
DEFAULT_K_MAX = 1000
# A true effect below this fraction of the largest one counts as zero: ranking among zero-effect
# nodes is arbitrary, so K stops at the number of nodes with a non-zero effect. Float32 patching
# leaves noise of ~1e-6 of the logits on nodes that cannot matter (an identical token at that
# position), which is about 1e-6 of a typical largest effect: 1e-4 stays clear of it.
ZERO_EFFECT = 1e-4
VERIFICATION_UNITS: tuple[str, ...] = ("forward", "partial")


def verified_recall_cost(
    true_abs: torch.Tensor,
    estimate_abs: torch.Tensor,
    own_cost: float,
    k_max: int,
    verify_cost: float | torch.Tensor = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Cost of verified recall and recall for K = 1..k_max on one ranking problem.

    Args:
        true_abs: [N] true |effect| of each node.
        estimate_abs: [N] the estimator's |score| of each node (ranking: descending, stable).
        own_cost: the estimator's own cost in forward-pass equivalents.
        k_max: largest K (at most N).
        verify_cost: cost of verifying one node: a number, or [N] one per node.

    Returns:
        (cost [k_max], recall [k_max]): ``cost[K-1]`` = own_cost + cost of the verifications needed for
        the true top-K; ``recall[K-1]`` = fraction of the true top-K among the estimator's top-K.

    Example:
        >>> cost, recall = verified_recall_cost(torch.tensor([3., 2, 1]), torch.tensor([1., 3, 2]), 0.0, 3)
        >>> cost.tolist()
        [3.0, 3.0, 3.0]
    """
    if true_abs.shape != estimate_abs.shape or true_abs.ndim != 1:
        raise InputError(
            f"truth and estimate must cover the same nodes; got {tuple(true_abs.shape)} and {tuple(estimate_abs.shape)}"
        )
    n = true_abs.numel()
    if not 1 <= k_max <= n:
        raise InputError(f"k_max must be in [1, {n}] (the number of nodes); got {k_max}")
    method_order = torch.sort(estimate_abs.double(), descending=True, stable=True).indices  # [N]
    rank = torch.empty(n, dtype=torch.long)
    rank[method_order] = torch.arange(n)
    true_top = torch.sort(true_abs.double(), descending=True, stable=True).indices[:k_max]  # [K]
    true_rank = rank[true_top]  # [K] position of the i-th true node in the method's order
    needed = torch.cummax(true_rank, 0).values  # [K] last position of the method's order to verify
    if isinstance(verify_cost, torch.Tensor):
        spent = torch.cumsum(verify_cost.double()[method_order], 0)  # [N] cost of verifying the first i+1
        cost = own_cost + spent[needed]
    else:
        cost = own_cost + float(verify_cost) * (needed.double() + 1.0)
    # Node i of the true order counts towards recall@K once K > i and K > its rank.
    first_k = torch.maximum(true_rank, torch.arange(k_max))  # [K] 0-based K index from which it counts
    counts = torch.bincount(first_k[first_k < k_max], minlength=k_max).cumsum(0).double()
    recall = counts / torch.arange(1, k_max + 1, dtype=torch.double)
    return cost.numpy(), recall.numpy()


def _check_complete(truth: Attribution, types: list[str]) -> None:
    """Refuse a ground truth that patched only part of the nodes (``layers=``, or missing node types)."""
    missing = [t for t in types if t not in truth.per_pair]
    if missing:
        raise InputError(
            f"the ground truth has no effects for node types {missing} (it covers {truth.node_types}); run "
            "activation_patching with those node types, or compare on the truth's node types only"
        )
    n_layers = int(truth.per_pair[types[0]].shape[1])
    layers = truth.info.get("layers")
    if layers is not None and sorted(set(layers)) != list(range(n_layers)):
        raise InputError(
            f"the ground truth covers only layers {sorted(set(layers))} of {n_layers} (activation_patching with "
            "layers=...): nodes of other layers were never patched, so recall against it would be wrong. Run "
            "activation_patching over all layers (layers=None; a checkpoint lets it resume)"
        )


def evaluate(
    truth: Attribution,
    estimates: Sequence[Attribution] | dict[str, Attribution],
    setting: str = "distribution",
    node_types: Sequence[str] | None = None,
    k_max: int | None = None,
    verification: str = "forward",
) -> Evaluation:
    """Cost of verified recall of each estimate against an exhaustive ground truth.

    Args:
        truth: exact effects (a method with ``exact = True``, e.g. ``activation_patching``); ``scores`` =
            mean signed effect.
        estimates: results of other methods on the same model, pairs, direction and node types;
            a dict gives each its label (default: the method id; estimates of one method are labelled by the
            options that differ between them, e.g. ``subsampling(samples=32)``, see ``labels``).
        setting: ``"distribution"`` (aggregate scores) or ``"per_pair"`` (each pair alone,
            geometric mean over pairs).
        node_types: restrict the comparison to these node types (default: the truth's).
        k_max: largest K; default min(1000, nodes with a non-zero true effect).
        verification: what one patched forward of a verification costs: ``"forward"`` (1, default)
            or ``"partial"`` ((L - l) / L for a node at layer l, the engine's real cost). A
            verification patches the node on every pair of the ranking problem: P forwards in the
            distribution setting, 1 per pair (module docstring).

    Returns:
        ``Evaluation`` with one ``MethodCurve`` per estimate; costs in forward passes.

    Raises:
        InputError: the truth is not exact, or an estimate does not match it.

    Example:
        >>> import atpstar
        >>> model = atpstar.load_model("toy-ioi")
        >>> pairs = atpstar.tasks.ioi(model.tokenizer, 4, seed=0)
        >>> truth = atpstar.attribute(model, pairs, "activation_patching", nodes=["query", "key"])
        >>> estimates = [atpstar.attribute(model, pairs, m, nodes=["query", "key"]) for m in ("atp", "atp+qkfix")]
        >>> table = atpstar.evaluate(truth, estimates, setting="distribution")
        >>> table.ranking()
        ['atp+qkfix', 'atp']
    """
    labelled, types = _check_inputs(truth, estimates, setting, node_types, verification)
    truth_abs, own_share, verify_cost = _problems(truth, types, setting, verification)
    n_nodes = truth_abs[0].numel()
    limit = min(_nonzero(t) for t in truth_abs)
    if limit == 0:
        raise InputError("every true effect is zero: the clean and noise prompts make no difference to the metric")
    k_max = min(DEFAULT_K_MAX, limit) if k_max is None else k_max
    if not 1 <= k_max <= n_nodes:
        raise InputError(f"k_max must be in [1, {n_nodes}] (the number of nodes); got {k_max}")
    curves = {
        label: _curve(label, estimate, truth_abs, types, setting, own_share, k_max, verify_cost)
        for label, estimate in labelled.items()
    }
    facts = (truth.n_pairs, truth.model_id, truth.metric, truth.direction, truth.cost.forward_equivalents)
    oracle = _oracle(truth_abs, k_max, verify_cost)
    return Evaluation(setting, np.arange(1, k_max + 1), curves, types, n_nodes, *facts, verification, oracle)


def _check_inputs(
    truth: Attribution,
    estimates: Sequence[Attribution] | dict[str, Attribution],
    setting: str,
    node_types: Sequence[str] | None,
    verification: str,
) -> tuple[dict[str, Attribution], list[str]]:
    """(label -> estimate, node types compared), after checking the truth, the estimates and the options."""
    if setting not in SETTINGS:
        raise InputError(f"unknown setting {setting!r}; choose one of {list(SETTINGS)}")
    if verification not in VERIFICATION_UNITS:
        raise InputError(f"unknown verification unit {verification!r}; choose one of {list(VERIFICATION_UNITS)}")
    if truth.method not in METHODS or not METHODS[truth.method].cls.exact:
        exact = [m for m, entry in METHODS.items() if entry.cls.exact]
        raise InputError(f"the ground truth must come from an exact method ({', '.join(exact)}); got {truth.method!r}")
    labelled = dict(estimates) if isinstance(estimates, dict) else labels(list(estimates))
    if not labelled:
        raise InputError("evaluate needs at least one estimate")
    types = check_node_types(list(node_types) if node_types is not None else truth.node_types)
    _check_complete(truth, types)
    for label, estimate in labelled.items():
        _check_match(truth, estimate, label, types)
    return labelled, types


def labels(estimates: list[Attribution]) -> dict[str, Attribution]:
    """Each estimate under its method id; estimates that share one are told apart by the options whose values
    differ between them, e.g. ``subsampling(samples=32)`` and ``subsampling(samples=512)``.

    Raises:
        InputError: two estimates of one method with the same options (one row would replace the other).
    """
    by_method: dict[str, list[int]] = {}
    for i, estimate in enumerate(estimates):
        by_method.setdefault(estimate.method, []).append(i)
    out: dict[int, str] = {}
    for method, group in by_method.items():
        options = [_numbers_options(estimates[i]) for i in group]
        keys = sorted({k for o in options for k in o if len({repr(other.get(k)) for other in options}) > 1})
        for i, kept in zip(group, options):
            out[i] = method if len(group) == 1 else f"{method}({', '.join(f'{k}={kept.get(k)}' for k in keys)})"
        seen: dict[str, int] = {}
        for i in group:
            if out[i] in seen:
                raise InputError(
                    f"estimates {seen[out[i]]} and {i} are both {method!r} with the same options, so one row would "
                    "replace the other; pass each estimate once, or a dict {label: estimate} to name them"
                )
            seen[out[i]] = i
    return {out[i]: estimate for i, estimate in enumerate(estimates)}


def _numbers_options(estimate: Attribution) -> dict[str, Any]:
    """The options of an estimate that change its numbers (bookkeeping ones such as ``memory_gb`` left out)."""
    return {k: v for k, v in estimate.options.items() if k not in BOOKKEEPING_OPTIONS}


def _problems(
    truth: Attribution, types: list[str], setting: str, verification: str
) -> tuple[list[torch.Tensor], float, float | torch.Tensor]:
    """The ranking problems: (true |effect| [N] per problem, share of an estimator's cost charged to each
    problem, cost of one verification: a number or [N] per node)."""
    n_pairs = truth.n_pairs
    if setting == "distribution":
        truth_abs = [_flat(truth.scores, types).abs()]
        own_share, pairs_per_verification = 1.0, n_pairs
    else:
        truth_abs = [_flat(truth.per_pair, types, pair).abs() for pair in range(n_pairs)]
        own_share, pairs_per_verification = 1.0 / n_pairs, 1
    verify_cost: float | torch.Tensor = float(pairs_per_verification)
    if verification == "partial":
        verify_cost = pairs_per_verification * _partial_forward(truth, types)  # [N]
    return truth_abs, own_share, verify_cost


def _curve(
    label: str,
    estimate: Attribution,
    truth_abs: list[torch.Tensor],
    types: list[str],
    setting: str,
    own_share: float,
    k_max: int,
    verify_cost: float | torch.Tensor,
) -> MethodCurve:
    """One estimate's curve: over the one aggregate problem, or the geometric mean over the per-pair ones."""
    own = estimate.cost.forward_equivalents * own_share
    passes = (label, estimate.cost.forward, estimate.cost.backward, own)
    if setting == "distribution":
        estimate_abs = _flat(estimate.scores, types).abs()
        cost, recall = verified_recall_cost(truth_abs[0], estimate_abs, own, k_max, verify_cost)
        return MethodCurve(*passes, cost, recall, options=dict(estimate.options))
    per_pair = [
        verified_recall_cost(truth, _flat(estimate.per_pair, types, p).abs(), own, k_max, verify_cost)
        for p, truth in enumerate(truth_abs)
    ]
    costs = np.stack([c for c, _ in per_pair])  # [P, K]
    recalls = np.stack([r for _, r in per_pair])  # [P, K]
    return MethodCurve(
        *passes,
        cost=np.exp(np.log(costs).mean(0)),
        recall=recalls.mean(0),
        cost_min=costs.min(0),
        cost_q25=np.quantile(costs, 0.25, axis=0),
        cost_q75=np.quantile(costs, 0.75, axis=0),
        cost_max=costs.max(0),
        options=dict(estimate.options),
    )


def _oracle(truth_abs: list[torch.Tensor], k_max: int, verify_cost: float | torch.Tensor) -> np.ndarray:
    """[K] cost of verifying exactly the true top-K, in the true order (geometric mean over problems)."""
    costs = [verified_recall_cost(t, t, 0.0, k_max, verify_cost)[0] for t in truth_abs]
    return np.exp(np.log(np.stack(costs)).mean(0))


def _partial_forward(truth: Attribution, types: list[str]) -> torch.Tensor:
    """[N] the share of a forward that patching each node alone costs, from its node space (``patch_share``:
    (L - l) / L for a node at layer l; edges by the receiver's layer, the same for every position)."""
    spaces = Spaces(spaces_from_info(truth.info, types))
    share_of = {}
    for t in types:
        shape, space = tuple(truth.scores[t].shape), spaces.of(t)
        if space.axes(t)[0] == "layer":  # the layer rule of ``patch_share``, on the result's own layout
            layers = torch.arange(shape[0], dtype=torch.float64).reshape(-1, *([1] * (len(shape) - 1)))
            share_of[t] = ((shape[0] - layers) / shape[0]).expand(shape)  # [*layout]
            continue
        share = space.patch_share(t, shape[-1], charged=True)  # [*layout], or without the position axis
        share_of[t] = share.reshape(*share.shape, *([1] * (len(shape) - share.ndim))).expand(shape)  # [*layout]
    return NodeLayout.like(share_of, types).flatten(share_of)


def _flat(tensors: dict[str, torch.Tensor], types: list[str], pair: int | None = None) -> torch.Tensor:
    """[N] all nodes of ``types`` (one pair's, or the aggregate), in node-type then layout order."""
    chosen = {t: (tensors[t] if pair is None else tensors[t][pair]).double() for t in types}
    # keep="top" results: sparse per-pair values (the nodes outside each pair's top-k count as 0).
    chosen = {t: v.to_dense() if v.is_sparse else v for t, v in chosen.items()}
    return NodeLayout.like(chosen, types).flatten(chosen)


def _nonzero(true_abs: torch.Tensor) -> int:
    top = float(true_abs.max())
    return int((true_abs > ZERO_EFFECT * top).sum()) if top > 0 else 0


def _check_match(truth: Attribution, estimate: Attribution, label: str, types: list[str]) -> None:
    missing = [t for t in types if t not in truth.scores or t not in estimate.scores]
    if missing:
        raise InputError(f"node types {missing} are missing from the ground truth or from estimate {label!r}")
    if estimate.direction != truth.direction:
        raise InputError(f"estimate {label!r} is {estimate.direction} but the ground truth is {truth.direction}")
    if truth.identity is not None and estimate.identity is not None:
        diff = differences(truth.identity, estimate.identity, (*MODEL_FIELDS, *PAIR_FIELDS))
        if diff:
            raise IdentityMismatchError(
                f"estimate {label!r} was not made on the ground truth's model and prompt pairs: {'; '.join(diff)} "
                "(saved = the ground truth's, now = the estimate's)"
            )
    if estimate.n_pairs != truth.n_pairs:
        raise InputError(f"estimate {label!r} has {estimate.n_pairs} pairs but the ground truth has {truth.n_pairs}")
    for t in types:
        if estimate.per_pair[t].shape != truth.per_pair[t].shape:
            raise InputError(
                f"estimate {label!r} node type {t!r} has shape {tuple(estimate.per_pair[t].shape)} but the ground "
                f"truth has {tuple(truth.per_pair[t].shape)}: not the same model or prompt pairs"
            )
