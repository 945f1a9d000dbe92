"""Sweep engines: the loops that patch nodes on prepared base/source runs, one module per engine.

Each engine computes one share of a sweep on a ``engine.PatchCache`` and knows nothing of where it
runs: methods call them in-process, ``atpstar.distributed`` work units call them on workers. They
import only downward (engine, nodes, ops), never methods, distributed or verify.

- ``patching``: exact single-node effects of every node of some layers (``patch_layers``; a list of
  nodes: ``engine.patch_listed``).
- ``subsampling``: random joint patches and their Welford in/out statistics (``subsample_range``).
- ``blocks``: joint patches of contiguous blocks of nodes (``patch_blocks``).

- ``edges``: exact single-edge effects of the edges read at one layer (``patch_edge_layer``), and
  random joint patches of edge subsets (``sample_edge_range``).
"""
