"""MIB's circuit files (circuit-localization track), written and read.

JSON (``Graph.to_json`` in EAP-IG / MIB):
    {"cfg": {"n_layers", "n_heads", "parallel_attn_mlp", "d_model"},
     "nodes": {"input": {"in_graph": bool}, "a0.h0": {...}, "m0": {...}, ..., "logits": {...}},
     "edges": {"input->a0.h0<q>": {"score": float, "in_graph": bool}, ...}}
``.pt`` (``Graph.to_pt``): a ``torch.save`` dict with ``cfg``, ``src_nodes`` (sender names, MIB
forward order), ``dst_nodes`` (receiver names, MIB backward order), ``edges_scores`` and
``edges_in_graph`` [n_src, n_dst] (entries that are not edges hold 0 / False), ``nodes_in_graph``
[n_src]. Names and orders are ``atpstar.edges.graph``'s, which are MIB's.

A node is in the graph when an in-graph edge leaves it and (``input`` excepted) one enters it, as
MIB derives it; ``logits`` always is.

Shape letters: S senders, R receivers, N edges.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..persist import atomic_path, write_text
from .circuits import edge_per_pair, receiver_owner, signed_mean
from .graph import EdgeGraph, check_convention

CFG_KEYS = ("n_layers", "n_heads", "parallel_attn_mlp", "d_model")


@dataclass
class MibCircuit:
    """A circuit file's content in edge order.

    Attributes:
        graph: the edge graph its ``cfg`` describes.
        d_model: from ``cfg``.
        scores: [N] edge scores.
        in_graph: bool [N] edges in the circuit.
        nodes_in_graph: bool [S] sender nodes in the circuit.
    """

    graph: EdgeGraph
    d_model: int
    scores: torch.Tensor
    in_graph: torch.Tensor
    nodes_in_graph: torch.Tensor


def nodes_in_graph(graph: EdgeGraph, in_graph: torch.Tensor) -> torch.Tensor:
    """bool [S]: senders with an in-graph edge out and (except ``input``) one in."""
    owner = receiver_owner(graph)
    has_out = torch.zeros(graph.n_senders, dtype=torch.bool)
    has_out[graph.sender_index[in_graph]] = True
    has_in = torch.zeros(graph.n_senders, dtype=torch.bool)
    fed = owner[graph.receiver_index[in_graph]]
    has_in[fed[fed >= 0]] = True
    has_in[0] = True
    return has_out & has_in


def save_mib(
    path: str | Path, graph: EdgeGraph, d_model: int, scores: torch.Tensor, in_graph: torch.Tensor | None = None
) -> Path:
    """Write a MIB circuit file: ``.json`` or ``.pt`` by the suffix. ``in_graph`` None: every edge."""
    path = Path(path)
    scores = torch.as_tensor(scores).detach().double().cpu()
    if scores.shape != (graph.n_edges,):
        raise InputError(f"edge scores must have shape [{graph.n_edges}]; got {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise InputError("edge scores contain NaN or inf; MIB files need finite scores")
    chosen = torch.ones(graph.n_edges, dtype=torch.bool) if in_graph is None else in_graph.bool().cpu()
    nodes = nodes_in_graph(graph, chosen)
    cfg = graph.cfg(d_model)
    if path.suffix == ".json":
        node_dict = {name: {"in_graph": bool(flag)} for name, flag in zip(graph.sender_names, nodes.tolist())}
        node_dict["logits"] = {"in_graph": True}
        edges = {
            name: {"score": float(s), "in_graph": bool(c)}
            for name, s, c in zip(graph.edge_names, scores.tolist(), chosen.tolist())
        }
        write_text(path, json.dumps({"cfg": cfg, "nodes": node_dict, "edges": edges}))
    elif path.suffix == ".pt":
        data = {
            "cfg": cfg,
            "src_nodes": graph.sender_names,
            "dst_nodes": graph.receiver_names,
            "edges_scores": graph.to_matrix(scores.float()),
            "edges_in_graph": graph.to_matrix(chosen.float()).bool(),
            "nodes_in_graph": nodes,
        }
        with atomic_path(path) as tmp:
            torch.save(data, tmp)
    else:
        raise InputError(f"MIB circuit files end in .json or .pt; got {path.name!r}")
    return path


def load_mib(path: str | Path) -> MibCircuit:
    """Read a MIB circuit file (``.json`` or ``.pt``), checking it against the graph its ``cfg`` describes.

    Example:
        >>> import atpstar, tempfile
        >>> model = atpstar.load_model("toy-ioi")
        >>> pairs = atpstar.tasks.ioi(model.tokenizer, 4, seed=0)
        >>> result = atpstar.attribute(model, pairs, method="atp", nodes=["edge"])
        >>> path = result.to_mib(tempfile.mkdtemp() + "/circuit.json", n_edges=10)
        >>> circuit = atpstar.load_mib(path)
        >>> circuit.scores.shape, int(circuit.in_graph.sum()) <= 10
        (torch.Size([102]), True)
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"no MIB circuit file at {path}")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: not valid JSON ({err}); the file may be truncated") from err
        graph, d_model = _graph_of_cfg(data, path)
        missing = [k for k in ("nodes", "edges") if k not in data]
        if missing:
            raise InputError(f"{path}: MIB circuit JSON lacks {missing}")
        edges = data["edges"]
        names = graph.edge_names
        absent = [n for n in names if n not in edges]
        unknown = sorted(set(edges) - set(names))
        if absent or unknown:
            raise InputError(
                f"{path}: edges do not match the graph of its cfg ({len(absent)} missing, e.g. {absent[:2]}; "
                f"{len(unknown)} unknown, e.g. {unknown[:2]})"
            )
        scores = torch.tensor([float(edges[n]["score"]) for n in names], dtype=torch.float64)
        in_graph = torch.tensor([bool(edges[n]["in_graph"]) for n in names])
        nodes = torch.tensor([bool(data["nodes"].get(n, {}).get("in_graph", False)) for n in graph.sender_names])
        return MibCircuit(graph, d_model, scores, in_graph, nodes)
    if path.suffix == ".pt":
        data = torch.load(path, map_location="cpu", weights_only=False)
        graph, d_model = _graph_of_cfg(data, path)
        needed = ("src_nodes", "dst_nodes", "edges_scores", "edges_in_graph", "nodes_in_graph")
        missing = [k for k in needed if k not in data]
        if missing:
            raise InputError(f"{path}: MIB circuit .pt lacks {missing}")
        if list(data["src_nodes"]) != graph.sender_names or list(data["dst_nodes"]) != graph.receiver_names:
            raise InputError(f"{path}: src_nodes/dst_nodes differ from MIB's order for its cfg")
        shape = (graph.n_senders, graph.n_receivers)
        for key in ("edges_scores", "edges_in_graph"):
            if tuple(data[key].shape) != shape:
                raise InputError(f"{path}: {key} has shape {tuple(data[key].shape)}; expected {shape}")
        scores = graph.from_matrix(data["edges_scores"].double())
        in_graph = graph.from_matrix(data["edges_in_graph"].bool())
        return MibCircuit(graph, d_model, scores, in_graph, data["nodes_in_graph"].bool())
    raise InputError(f"MIB circuit files end in .json or .pt; got {path.name!r}")


def _graph_of_cfg(data: Any, path: Path) -> tuple[EdgeGraph, int]:
    cfg = data.get("cfg") if isinstance(data, dict) else None
    if not isinstance(cfg, dict) or any(k not in cfg for k in CFG_KEYS[:3]):
        raise InputError(f"{path}: a MIB circuit file needs cfg with {list(CFG_KEYS)}")
    graph = EdgeGraph(int(cfg["n_layers"]), int(cfg["n_heads"]), bool(cfg["parallel_attn_mlp"]))
    return graph, int(cfg.get("d_model", 0))


MIB_BATCH_SIZE = 20  # MIB's run_attribution.py default: scores carry 1 / batch size (``mib_scores``)


def batch_sizes(n_pairs: int, batch_size: int) -> torch.Tensor:
    """[P] the size of each pair's batch when P pairs are cut into consecutive batches of ``batch_size``."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(
            f"batch_size must be a positive integer (MIB's default is {MIB_BATCH_SIZE}); got {batch_size!r}"
        )
    start = torch.arange(n_pairs) // batch_size * batch_size  # [P] first pair of each pair's batch
    return torch.clamp(n_pairs - start, max=batch_size)


def mib_scores(result: Any, batch_size: int = MIB_BATCH_SIZE) -> torch.Tensor:
    """[N] the edge scores MIB's own code would store for this result (``to_mib`` writes them).

    MIB attributes the loss -(logit difference), averaged over a batch. An estimate's score is
    -(1/P) Σ_i ŝ_i / b(i), b(i) the size of pair i's batch (-mean / B with equal batches), as EAP and
    EAP-IG accumulate it; an exact method's is -(mean over batches of the batch mean effect). Higher
    is more important: the edges whose patching lowers the metric most. GradDrop's magnitudes (``atp*``,
    ``atp+graddrop``) take the sign of their estimate before GradDrop (``circuits.signed_mean``, 0029).

    Args:
        result: a noising ``Attribution`` with position-summed edges.
        batch_size: MIB's attribution batch size B.

    Raises:
        InputError: no edges, position-resolved edges, or a denoising result (MIB patches clean runs).
    """
    per_pair = edge_per_pair(result)
    sizes = batch_sizes(per_pair.shape[0], batch_size).to(torch.float64)  # [P]
    if _is_exact(result):
        batch = torch.arange(per_pair.shape[0]) // batch_size  # [P]
        means = torch.zeros(int(batch.max()) + 1, per_pair.shape[1], dtype=torch.float64)
        means.index_add_(0, batch, per_pair / sizes[:, None])  # [n_batches, N] batch means
        return -means.mean(0)
    return -signed_mean(result, sizes)


def _is_exact(result: Any) -> bool:
    """Exact effects: the result's scores are the signed mean over pairs (``aggregation`` "mean")."""
    return bool(result.aggregation == "mean")


def check_result_convention(result: Any, convention: str) -> None:
    """Refuse a post-norm result whose head-sender convention is not ``convention`` (0019)."""
    check_convention(convention, "convention")
    made = result.edge_graph().convention
    if made is not None and made != convention:
        raise InputError(
            f"this result was made with edge_convention={made!r} on a post-norm model, where head senders "
            f"differ; rerun the method with edge_convention={convention!r} (MIB's files need 'mib'), or pass "
            f"convention={made!r} to write it anyway"
        )


def attribution_to_mib(
    result: Any,
    path: str | Path,
    n_edges: int | None,
    prune: bool,
    *,
    absolute: bool = False,
    convention: str = "mib",
    batch_size: int = MIB_BATCH_SIZE,
) -> Path:
    """``Attribution.to_mib``: the result's MIB scores (``mib_scores``) as a MIB circuit file."""
    from .circuits import top_edges

    check_result_convention(result, convention)
    graph = result.edge_graph()
    scores = mib_scores(result, batch_size)
    chosen = None if n_edges is None else top_edges(graph, scores, n_edges, prune, absolute=absolute)
    return save_mib(path, graph, int(result.info["edge_graph"].get("d_model", 0)), scores, chosen)
