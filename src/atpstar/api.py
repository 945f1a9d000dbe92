"""The one verb: ``attribute``."""

from __future__ import annotations

from typing import Any

from .methods import build_method
from .nodes import NODE_TYPES
from .pairs import PromptPairs
from .result import Attribution


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
    **options: Any,
) -> Attribution:
    """Attribute the metric of ``pairs`` to every node of the requested types with one method.

    Same as ``METHODS[method](**options).attribute(model, pairs, nodes, direction=..., progress=...)``.

    Args:
        model: an ``atpstar.Model`` (``load_model``) or a ``transformers`` causal LM.
        pairs: ``PromptPairs`` with their metric.
        method: a method id from ``atpstar.METHODS`` (``activation_patching``, ``atp``, ``atp+qkfix``,
            ``atp+graddrop``, ``atp*``, ``subsampling``, ``blocks``, ``hierarchical``).
        nodes: node types: ``neuron``, ``query``, ``key``, ``value``, ``head``.
        direction: ``"noising"`` (default, the paper's) or ``"denoising"``.
        progress: show a progress bar.
        workers: run on this many Ray workers (``activation_patching``, ``subsampling``, ``blocks``,
            ``hierarchical``; needs ``pip install 'atpstar[distributed]'``); None: in-process. Same
            numbers either way (up to float rounding of batch composition).
        ray_address: None starts a local Ray instance; ``"auto"`` joins a running cluster.
        **options: the method's own options (see its class).

    Returns:
        ``Attribution`` with ``per_pair``, ``scores``, ``top(k)``, ``cost``.

    Example:
        >>> result = attribute(model, pairs, method="activation_patching", nodes=["head"])
    """
    return build_method(method, **options).attribute(
        model, pairs, nodes, direction=direction, progress=progress, workers=workers, ray_address=ray_address
    )
