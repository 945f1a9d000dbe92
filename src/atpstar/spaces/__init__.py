"""Node spaces: every kind of node behind one protocol (``NodeSpace``).

Built in: ``SiteNodes`` (neurons, queries, keys, values, head outputs: one runner site each),
``EdgeNodes`` (the MIB/EAP-IG edge graph) and ``LatentNodes`` (the latents and errors of attached SAEs and
transcoders). ``register_space`` adds another.
"""

from __future__ import annotations

from ..nodes import NodeLayout
from .base import (
    SPACES,
    NodeSpace,
    Spaces,
    check_node_types,
    known_types,
    register_space,
    space_class,
    spaces_for,
    spaces_from_info,
    unregister_space,
)
from .sites import BuiltinSites, SiteNodes

# isort: split
# registry order (and so the order of node types in results): sites, then edges, then dictionary latents
from .edges import EdgeNodes

# isort: split
from .latents import LatentNodes

# The node types of the built-in spaces: a method's ``node_types`` says which of them it scores;
# node types of spaces registered later are supported by every method with the space's engine.
BUILTIN_TYPES: tuple[str, ...] = known_types()

__all__ = [
    "BUILTIN_TYPES",
    "SPACES",
    "BuiltinSites",
    "EdgeNodes",
    "LatentNodes",
    "NodeLayout",
    "NodeSpace",
    "SiteNodes",
    "Spaces",
    "check_node_types",
    "known_types",
    "register_space",
    "space_class",
    "spaces_for",
    "spaces_from_info",
    "unregister_space",
]
