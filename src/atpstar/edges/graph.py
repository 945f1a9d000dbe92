"""The edge graph of MIB and EAP-IG: senders, receivers, valid edges and their names.

Senders (MIB's "forward" nodes, in this order): ``input`` (the embedding), then per layer l the
heads ``a{l}.h{h}`` (head h's write W_O^h z_h) and ``m{l}`` (the MLP's write).
Receivers (MIB's "backward" nodes, in this order): per layer l the query inputs
``a{l}.h{h}<q>`` of every head, then the key inputs ``<k>``, the value inputs ``<v>``, then ``m{l}``;
last ``logits`` (the final residual stream before the final norm). Grouped-query models are
ungrouped as MIB does: every query head has its own key and value receiver.

An edge s -> r exists when s writes to the residual stream before r reads it: every sender of an
earlier layer (and ``input``) reaches every receiver of a later layer; a head reaches the MLP of its
own layer only in sequential blocks (GPT-NeoX's parallel residual feeds attention and MLP the same
input, so ``a{l}.h{h} -> m{l}`` is not an edge there); every sender reaches ``logits``.

Edge order (what ``edge_names`` returns and ``per_pair["edge"]`` follows) is EAP-IG's: layer by
layer, first every upstream sender into the query/key/value receivers (sender-major, then head,
then q, k, v), then every upstream sender into ``m{l}``; finally every sender into ``logits``.

Shape letters: S senders, R receivers, N edges, L layers, H heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from ..errors import InputError

QKV = ("q", "k", "v")


@dataclass(frozen=True)
class EdgeGraph:
    """Sizes fix the graph; everything else is derived (and cached per size).

    Attributes:
        n_layers: transformer layers.
        n_heads: query heads per layer (key/value receivers are per query head).
        parallel: attention and MLP of one layer read the same residual stream (GPT-NeoX).
        convention: what a head sends on a post-norm model (0019): ``"atpstar"``, its share of the
            normalised write, or ``"mib"``, its write before the norm (exact effects pass the norm);
            None on models without a post-attention norm, where both are W_O^h z_h. Not part of the
            graph's identity: the edges are the same.

    Example:
        >>> import atpstar
        >>> graph = atpstar.EdgeGraph(n_layers=2, n_heads=4, parallel=True)  # toy-ioi's graph
        >>> graph.n_senders, graph.n_receivers, graph.n_edges
        (11, 27, 102)
        >>> graph.sender_names[:3], graph.receiver_names[-2:]
        (['input', 'a0.h0', 'a0.h1'], ['m1', 'logits'])
    """

    n_layers: int
    n_heads: int
    parallel: bool
    convention: str | None = field(default=None, compare=False)

    @property
    def mib_heads(self) -> bool:
        """Head senders are the writes before the post-attention norm (MIB's convention on a post-norm model)."""
        return self.convention == "mib"

    # Sizes -------------------------------------------------------------------------------------
    @property
    def n_senders(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def n_receivers(self) -> int:
        return self.n_layers * (3 * self.n_heads + 1) + 1

    @property
    def n_edges(self) -> int:
        return int(self.sender_index.numel())

    # Indices -----------------------------------------------------------------------------------
    def head_sender(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_sender(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def qkv_receiver(self, layer: int, kind: str, head: int) -> int:
        return layer * (3 * self.n_heads + 1) + QKV.index(kind) * self.n_heads + head

    def mlp_receiver(self, layer: int) -> int:
        return layer * (3 * self.n_heads + 1) + 3 * self.n_heads

    @property
    def logits_receiver(self) -> int:
        return self.n_receivers - 1

    def receiver_layer(self, receiver: int) -> int:
        """Layer a receiver reads at (``n_layers`` for logits)."""
        return min(receiver // (3 * self.n_heads + 1), self.n_layers)

    def patch_share(self) -> torch.Tensor:
        """[N] share of a forward that exact patching of each edge costs (``evaluate``'s partial unit).

        A receiver at layer l < L starts the patched run at l: (L - l) / L; a q/k/v receiver adds its
        layer's norm + projection on its own input (charged 1 / L, as the sweep does). A logits receiver
        needs only the unembedding, which the sweep counts as free; here it is charged 1 / L so that no
        verification costs nothing (a zero cost has no place on the log scale of the comparison).
        """
        receiver = self.receiver_index
        layer = torch.clamp(receiver // (3 * self.n_heads + 1), max=self.n_layers).double()  # [N]
        qkv = (receiver % (3 * self.n_heads + 1) < 3 * self.n_heads) & (layer < self.n_layers)
        share = (self.n_layers - layer + qkv.double()) / self.n_layers
        return torch.where(layer == self.n_layers, 1.0 / self.n_layers, share)

    def senders_before(self, receiver: int) -> int:
        """Senders 0 .. n-1 (MIB order) are exactly the ones upstream of ``receiver``."""
        return int(self.valid[:, receiver].sum())

    # Names -------------------------------------------------------------------------------------
    @property
    def sender_names(self) -> list[str]:
        return list(_names(self)[0])

    @property
    def receiver_names(self) -> list[str]:
        return list(_names(self)[1])

    @property
    def node_names(self) -> list[str]:
        """MIB's node names: the senders, then ``logits``."""
        return self.sender_names + ["logits"]

    @property
    def edge_names(self) -> list[str]:
        return list(_edge_names(self))

    # Masks -------------------------------------------------------------------------------------
    @property
    def valid(self) -> torch.Tensor:
        """[S, R] bool: which (sender, receiver) pairs are edges."""
        return _tables(self)[0].clone()

    @property
    def sender_index(self) -> torch.Tensor:
        """[N] sender of each edge, in edge order."""
        return _tables(self)[1]

    @property
    def receiver_index(self) -> torch.Tensor:
        """[N] receiver of each edge, in edge order."""
        return _tables(self)[2]

    def to_matrix(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[..., N] per-edge values -> [..., S, R] matrix (``fill`` where there is no edge)."""
        out = torch.full((*values.shape[:-1], self.n_senders, self.n_receivers), fill, dtype=values.dtype)
        out[..., self.sender_index, self.receiver_index] = values
        return out

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """[..., S, R] -> [..., N] in edge order."""
        return matrix[..., self.sender_index, self.receiver_index]

    def describe(self) -> dict[str, Any]:
        """What rebuilds this graph (kept in ``Attribution.info["edge_graph"]``)."""
        sizes = {"n_layers": self.n_layers, "n_heads": self.n_heads, "parallel": self.parallel}
        return sizes if self.convention is None else {**sizes, "convention": self.convention}

    @classmethod
    def from_description(cls, data: dict[str, Any]) -> EdgeGraph:
        convention = data.get("convention")
        return cls(int(data["n_layers"]), int(data["n_heads"]), bool(data["parallel"]), convention)

    def cfg(self, d_model: int) -> dict[str, Any]:
        """MIB's graph ``cfg`` block."""
        return {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "parallel_attn_mlp": self.parallel,
            "d_model": d_model,
        }


def _receiver_order(graph: EdgeGraph) -> list[tuple[int, int]]:
    """(sender, receiver) pairs in EAP-IG's edge order."""
    order: list[tuple[int, int]] = []
    upstream = [0]
    heads = graph.n_heads
    for layer in range(graph.n_layers):
        layer_heads = [graph.head_sender(layer, h) for h in range(heads)]
        for sender in upstream:
            for head in range(heads):
                for kind in QKV:
                    order.append((sender, graph.qkv_receiver(layer, kind, head)))
            if graph.parallel:
                order.append((sender, graph.mlp_receiver(layer)))
        upstream = upstream + layer_heads
        if not graph.parallel:
            order.extend((sender, graph.mlp_receiver(layer)) for sender in upstream)
        upstream = upstream + [graph.mlp_sender(layer)]
    order.extend((sender, graph.logits_receiver) for sender in upstream)
    return order


@lru_cache(maxsize=16)
def _tables(graph: EdgeGraph) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pairs = torch.tensor(_receiver_order(graph), dtype=torch.long)  # [N, 2]
    valid = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)
    valid[pairs[:, 0], pairs[:, 1]] = True
    return valid, pairs[:, 0].contiguous(), pairs[:, 1].contiguous()


@lru_cache(maxsize=16)
def _names(graph: EdgeGraph) -> tuple[tuple[str, ...], tuple[str, ...]]:
    senders = ["input"]
    receivers = []
    for layer in range(graph.n_layers):
        senders += [f"a{layer}.h{h}" for h in range(graph.n_heads)] + [f"m{layer}"]
        for kind in QKV:
            receivers += [f"a{layer}.h{h}<{kind}>" for h in range(graph.n_heads)]
        receivers.append(f"m{layer}")
    receivers.append("logits")
    return tuple(senders), tuple(receivers)


@lru_cache(maxsize=16)
def _edge_names(graph: EdgeGraph) -> tuple[str, ...]:
    senders, receivers = _names(graph)
    out = []
    for s, r in zip(graph.sender_index.tolist(), graph.receiver_index.tolist()):
        out.append(f"{senders[s]}->{receivers[r]}")  # e.g. input->a0.h0<q>, a0.h1->m1, m3->logits
    return tuple(out)


CONVENTIONS = ("atpstar", "mib")


def graph_of(model: Any, convention: str = "atpstar") -> EdgeGraph:
    """The edge graph of a wrapped model (or a ``transformers`` model).

    Args:
        convention: the head-sender convention (``EdgeGraph.convention``); kept only on post-norm models.
    """
    from ..model import as_model

    check_convention(convention)
    wrapped = as_model(model)
    kept = convention if getattr(wrapped, "post_norm", False) else None
    return EdgeGraph(wrapped.n_layers, wrapped.n_heads, is_parallel(wrapped), kept)


def check_convention(convention: object, what: str = "edge_convention") -> None:
    """Refuse a head-sender convention other than ``"atpstar"`` and ``"mib"``."""
    if convention not in CONVENTIONS:
        raise InputError(f"unknown {what} {convention!r}; choose one of {list(CONVENTIONS)}")


def is_parallel(model: Any) -> bool:
    """Attention and MLP of a layer read the same residual stream (GPT-NeoX unless disabled in its config)."""
    return bool(model.parallel_residual)


def edge_names(model: Any) -> list[str]:
    """MIB/EAP-IG names of every edge of ``model``, in the order of ``per_pair["edge"]``.

    Example:
        >>> import atpstar
        >>> model = atpstar.load_model("toy-ioi")
        >>> names = atpstar.edge_names(model)
        >>> len(names), names[:2]
        (102, ['input->a0.h0<q>', 'input->a0.h0<k>'])
    """
    return graph_of(model).edge_names


def edge_node_name(names: list[str], index: tuple[int, ...]) -> str:
    """Name of a position-summed edge ``(n,)`` (``a0.h1->m1``) or a position-resolved one ``(n, t)``:
    ``a0.h1->m1[pos 3]``, t being the position of the sender's output (the residual position it changes)."""
    return names[index[0]] if len(index) == 1 else f"{names[index[0]]}[pos {index[1]}]"
