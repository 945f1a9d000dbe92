"""Sparse dictionaries (SAEs, transcoders) whose latents are nodes: loading, sites, the attached set.

- ``dictionary``: the ``Dictionary`` dataclass (encode, write, error, content hash);
- ``formats``: ``load_dictionary`` for SAELens, Gemma Scope 2 and circuit-tracer files (or a hub id);
- ``sites``: TransformerLens hook names mapped onto the backend's run sites, and the fit check;
- ``registry``: the dictionaries a process knows by name (the latent node space owns their names).

The computations on latents (exact patching, the gradient estimates) are in ``dictionaries.patching`` and
``dictionaries.estimate``; the node space in ``atpstar.spaces.latents``.
"""

from __future__ import annotations

from .dictionary import Dictionary
from .formats import load_dictionary
from .registry import attach, attached, detach, node_types_of

__all__ = ["Dictionary", "attach", "attached", "detach", "load_dictionary", "node_types_of"]
