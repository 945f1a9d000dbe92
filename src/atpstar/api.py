"""The one verb: ``attribute``; and ``predict_memory`` for the memory it will need."""

from __future__ import annotations

from typing import Any

from .errors import InputError
from .memory import MemoryPlan
from .methods import build_method
from .model import as_model
from .nodes import NODE_TYPES
from .pairs import PromptPairs
from .result import Attribution
from .spaces import check_node_types, space_class


def attribute(
    model: Any,
    pairs: PromptPairs,
    method: str = "atp*",
    nodes: Any = NODE_TYPES,
    *,
    direction: str = "noising",
    progress: bool = False,
    workers: int | None = None,
    ray_address: str | None = None,
    dictionaries: Any = (),
    **options: Any,
) -> Attribution:
    """Attribute the metric of ``pairs`` to every node of the requested types with one method.

    Same as ``METHODS[method](**options).attribute(model, pairs, nodes, direction=..., progress=...)``.

    Args:
        model: an ``atpstar.Model`` (``load_model``) or a ``transformers`` causal LM.
        pairs: ``PromptPairs`` with their metric.
        method: a method id from ``atpstar.METHODS`` (``atpstar methods`` lists them with one line each).
        nodes: node types of the registered node spaces: ``neuron``, ``query``, ``key``, ``value``, ``head``
            (site nodes), ``edge`` (the MIB/EAP-IG edge graph), and any a registered space adds.
        direction: ``"noising"`` (default, the paper's) or ``"denoising"``.
        progress: show a progress bar.
        workers: run on this many Ray workers (methods with ``distributable = True``; needs
            ``pip install 'atpstar[distributed]'``); None: in-process. Same numbers either way (up to float
            rounding of batch composition).
        ray_address: None starts a local Ray instance; ``"auto"`` joins a running cluster.
        dictionaries: SAEs/transcoders (``load_dictionary``) whose latents are nodes too: each adds the node types
            ``d.name`` ([P, d_sae, T]) and ``d.name + ".error"`` ([P, T]) unless ``nodes`` lists one of them.
        **options: the method's own options (see its class).

    Returns:
        ``Attribution`` with ``per_pair``, ``scores``, ``top(k)``, ``cost``.

    Example:
        >>> import atpstar
        >>> model = atpstar.load_model("toy-ioi")
        >>> pairs = atpstar.tasks.ioi(model.tokenizer, 4, seed=0)
        >>> result = atpstar.attribute(model, pairs, method="atp+qkfix", nodes=["key", "head"])
        >>> result.per_pair["key"].shape  # [P, L, K, T]
        torch.Size([4, 2, 4, 15])
        >>> print(result.cost)
        8.0 forward + 4.0 backward = 16.0 forward-equivalents
        >>> result.top(1)  # doctest: +ELLIPSIS
        [RankedNode(node_type='key', index=(1, 0, 10), name='blocks.1.attn.hook_k[pos 10, head 0]', score=6.64...)]
    """
    chosen = build_method(method, **options)
    nodes = with_dictionaries(nodes, dictionaries)
    return chosen.attribute(
        model, pairs, nodes, direction=direction, progress=progress, workers=workers, ray_address=ray_address
    )


def with_dictionaries(nodes: Any, dictionaries: Any) -> Any:
    """``nodes`` plus the node types of ``dictionaries`` (attached first); each dictionary adds its latents and
    error unless ``nodes`` names one of them already."""
    if not dictionaries:
        return nodes
    from .spaces.latents import attach

    listed = [nodes] if isinstance(nodes, str) else list(nodes)
    for dictionary in list(dictionaries):
        types = attach([dictionary])
        listed += [] if set(types) & set(listed) else types
    return listed


def predict_memory(
    model: Any, n_pairs: int, seq_len: int, method: str = "atp*", nodes: Any = NODE_TYPES, **options: Any
) -> MemoryPlan:
    """Predicted peak memory of ``attribute(model, pairs, method, nodes, **options)`` before running it.

    Args:
        model: an ``atpstar.Model`` or a ``transformers`` causal LM.
        n_pairs, seq_len: the number of prompt pairs and their token length.
        method, nodes, **options: as for ``attribute`` (``memory_gb``, ``batch_size``, ``keep``...).

    Returns:
        ``MemoryPlan``: weights, run and per-batch parts in GiB, the batch that fits, ``peak_gb``.

    Raises:
        InputError: the run does not fit in ``memory_gb``, or the method makes no prediction.

    Example:
        >>> import atpstar
        >>> model = atpstar.load_model("toy-ioi")
        >>> plan = atpstar.predict_memory(model, n_pairs=256, seq_len=15, method="atp*", nodes=["neuron"], keep="top")
        >>> plan.batch, round(plan.peak_gb, 3)
        (256, 0.149)
    """
    chosen = build_method(method, **options)
    node_types = check_node_types(nodes)
    unplanned = [t for t in node_types if space_class(t).engine != "sites"]
    if unplanned:
        raise InputError(
            f"predict_memory plans runs over site nodes (neurons, queries, keys, values, heads, ...); node types "
            f"{unplanned} have no memory model yet: leave them out of nodes=, or run them with batch_size= set"
        )
    plan = chosen.memory_plan(as_model(model), n_pairs, seq_len, node_types)
    if plan is None:
        raise InputError(f"method {method!r} makes no memory prediction")
    return plan
