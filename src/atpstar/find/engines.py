"""What ``find`` needs to know of each node-space engine (``NodeSpace.engine``) beyond the protocol.

The search prices its steps before it runs them: the forward cost of patching one node alone as the
exact sweep counts it (``NodeSpace.patch_share``), and the cost of one joint patch of the bound. It also records what
names its nodes in a saved result, and whether the engine verifies and bounds on Ray workers (and
together with other spaces).

Shape letters: N nodes of one node type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from ..model import Model
from ..spaces import NodeSpace, Spaces


@dataclass(frozen=True)
class EngineFacts:
    """One engine's prices and needs (each a function of the model and the space)."""

    patch_cost: Callable[[Model, NodeSpace, str, int], torch.Tensor]  # [*layout] forwards per node and pair
    joint_patch_cost: Callable[[Model, torch.Tensor, float], float]  # one bound sample: (model, unverified [N], p)
    naming: Callable[[Model], dict[str, Any]]  # what a result's info keeps to name the nodes without the model
    distributable: bool  # runs on workers and beside other spaces


def _patch_cost(model: Model, space: NodeSpace, node_type: str, seq_len: int) -> torch.Tensor:
    return space.patch_share(node_type, seq_len)  # as the exact sweep counts it (an edge into the logits: free)


def _edge_joint_patch_cost(model: Model, unverified: torch.Tensor, p: float) -> float:
    from ..edges.subsampling import joint_patch_cost

    return joint_patch_cost(model, unverified, p)


def _edge_naming(model: Model) -> dict[str, Any]:
    from ..edges.graph import graph_of

    return {"edge_graph": graph_of(model).describe()}


ENGINES: dict[str, EngineFacts] = {
    "sites": EngineFacts(_patch_cost, lambda model, unverified, p: 1.0, lambda model: {}, True),
    "edges": EngineFacts(_patch_cost, _edge_joint_patch_cost, _edge_naming, False),
    "latents": EngineFacts(_patch_cost, lambda model, unverified, p: 1.0, lambda model: {}, False),
}


def engine_facts(spaces: Spaces, engine: dict[str, Any]) -> EngineFacts:
    """The facts of the searched spaces' engine; an engine that is not distributable is searched alone, in-process.

    Raises:
        InputError: a space find cannot search, or one searched beside others or on workers when it cannot be.
    """
    engines = {space.engine for space in spaces}
    unknown = engines - set(ENGINES)
    if unknown:
        raise InputError(f"find cannot search nodes of engine(s) {sorted(unknown)}; search site nodes or edges")
    facts = [ENGINES[e] for e in sorted(engines)]
    if len(engines) > 1 and not all(f.distributable for f in facts):
        kinds = [space.kind for space in spaces if not ENGINES[space.engine].distributable]
        raise InputError(f"find over {kinds[0]} runs on {kinds[0]} alone and in-process: search the other nodes apart")
    if not facts[0].distributable and any(v is not None for v in engine.values()):
        kind = spaces.spaces[0].kind
        raise InputError(f"find over {kind} runs on {kind} alone and in-process: drop workers=/ray_address=")
    return facts[0]
