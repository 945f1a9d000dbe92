"""Edges of the MIB/EAP-IG graph: graph and names, exact edge patching, EAP, EAP-IG and edge AtP*.

Edges are one more node type: ``atpstar.attribute(model, pairs, method=m, nodes=["edge"])`` gives
``per_pair["edge"]`` [P, N] in the order of ``edge_names(model)``.
"""

from __future__ import annotations

from .graph import EdgeGraph, edge_names, graph_of

__all__ = ["EdgeGraph", "edge_names", "graph_of"]
