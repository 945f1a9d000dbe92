"""Edges of the MIB/EAP-IG graph: graph and names, exact edge patching, EAP, EAP-IG and edge AtP*.

Edges are one more node type: ``atpstar.attribute(model, pairs, method=m, nodes=["edge"])`` gives
``per_pair["edge"]`` [P, N] in the order of ``edge_names(model)`` ([P, N, T] with ``edge_positions=True``).
"""

from __future__ import annotations

from .circuits import MIB_FRACTIONS, FaithfulnessCurve, faithfulness_curve, top_edges
from .graph import EdgeGraph, edge_names, graph_of
from .mib import MibCircuit, load_mib, mib_scores, save_mib

__all__ = [
    "MIB_FRACTIONS",
    "EdgeGraph",
    "FaithfulnessCurve",
    "MibCircuit",
    "edge_names",
    "faithfulness_curve",
    "graph_of",
    "load_mib",
    "mib_scores",
    "save_mib",
    "top_edges",
]
