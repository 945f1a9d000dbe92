"""Where per-pair results go as batches of pairs complete: all in memory, top-k per pair, or disk shards.

Neuron results of a large model over many pairs do not fit in memory (Llama-3.1-8B, 256 pairs of 512
tokens: 32 layers x 512 x 14336 neurons x 256 pairs x 4 bytes = 240 GB). ``keep="top"`` holds, per
pair and node type, only the ``top_k`` nodes with the largest |value|; ``keep="disk"`` also streams every
batch's full per-pair tensors to safetensors shards in ``out_dir`` (read back with ``read_per_pair``).
``scores`` are exact in every mode: with ``"top"``/``"disk"`` from running sums over all pairs in float64
(only the one the method's aggregation needs), with ``"all"`` from the dense tensors at the end.

Shape letters: P pairs, b pairs in a batch, k top_k.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import InputError
from .persist import atomic_path, write_text

KEEP: tuple[str, ...] = ("all", "top", "disk")
INDEX_FILE = "per_pair_index.json"


def check_keep(keep: Any, top_k: Any, out_dir: Any) -> None:
    """Raise ``InputError`` for bad ``keep``/``top_k``/``out_dir`` options (before any pass)."""
    if keep not in KEEP:
        raise InputError(f"unknown keep={keep!r}; choose one of {list(KEEP)}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise InputError(f"top_k must be an integer >= 1; got {top_k!r}")
    if keep == "disk" and not out_dir:
        raise InputError("keep='disk' streams per-pair tensors to safetensors shards: pass out_dir='<folder>'")
    if keep == "disk" and Path(out_dir).exists() and any(Path(out_dir).glob("per_pair-*.safetensors")):
        raise InputError(f"out_dir {out_dir} already holds per-pair shards; choose an empty folder or delete them")


class PerPairSink:
    """Receives per-pair results batch by batch and keeps what ``keep`` asks for.

    Args:
        shapes: node type -> per-pair layout.
        n_pairs: P.
        dtype: dtype of the kept per-pair values.
        keep: ``"all"`` (dense [P, *layout]), ``"top"`` (sparse [P, *layout] with top_k entries per pair and
            type) or ``"disk"`` (top as well, plus every batch's dense tensors in a shard under ``out_dir``).
        top_k: entries kept per pair and node type for ``"top"``/``"disk"``.
        out_dir: folder for ``"disk"`` shards.
        aggregation: the scores ``scores`` will be asked for (``"mean"`` or ``"mean_abs"``); only that running
            sum is kept, and none with ``"all"`` (the dense per-pair tensors give the scores).
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        n_pairs: int,
        dtype: torch.dtype,
        keep: str = "all",
        top_k: int = 100,
        out_dir: str | None = None,
        aggregation: str = "mean_abs",
    ) -> None:
        self.shapes, self.n_pairs, self.dtype, self.keep = shapes, n_pairs, dtype, keep
        self.aggregation = aggregation
        self.top_k = {t: min(top_k, int(torch.Size(s).numel())) for t, s in shapes.items()}
        self.out_dir = Path(out_dir) if out_dir else None
        self.dense = {t: torch.zeros(n_pairs, *s, dtype=dtype) for t, s in shapes.items()} if keep == "all" else {}
        # Σ_p value ("mean") or Σ_p |value| ("mean_abs"), float64; "all" aggregates the dense tensors instead
        self.total = {} if keep == "all" else {t: torch.zeros(s, dtype=torch.float64) for t, s in shapes.items()}
        self.top_index: dict[str, list[torch.Tensor]] = {t: [] for t in shapes}  # [b, k] flat indices
        self.top_value: dict[str, list[torch.Tensor]] = {t: [] for t in shapes}  # [b, k]
        self.top_pairs: list[torch.Tensor] = []
        self.shards: list[str] = []
        if self.out_dir is not None and keep == "disk":
            self.out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, index: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Take the results of pairs ``index`` [b]: node type -> [b, *layout] on any device."""
        for t, total in self.total.items():
            # Sums on the value's own device (no host copy of the dense tensor unless it is kept).
            value = values[t] if self.aggregation == "mean" else values[t].abs()
            total += value.sum(0, dtype=torch.float64).cpu()
        if self.keep == "all":
            first, n = int(index[0]), len(index)
            consecutive = bool((index == torch.arange(first, first + n, device=index.device)).all())
            rows = slice(first, first + n) if consecutive else index  # batches of pairs are slices: a plain copy
            for t, value in values.items():
                self.dense[t][rows] = value.to(self.dtype).cpu()
            return
        self.top_pairs.append(index.cpu())
        for t, value in values.items():
            flat = value.flatten(1)  # [b, N_t]
            top = flat.abs().topk(self.top_k[t], dim=1).indices  # [b, k]
            self.top_index[t].append(top.cpu())
            self.top_value[t].append(flat.gather(1, top).to(self.dtype).cpu())
        if self.keep == "disk" and self.out_dir is not None:
            self._write_shard(index, values)

    def _write_shard(self, index: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        first, last = int(index[0]), int(index[-1])
        name = f"per_pair-{first:07d}-{last:07d}.safetensors"
        tensors = {f"per_pair/{t}": v.to(self.dtype).cpu().contiguous() for t, v in values.items()}
        tensors["pairs"] = index.cpu().contiguous()
        with atomic_path(self.out_dir / name) as tmp:  # type: ignore[operator]
            save_file(tensors, str(tmp))
        self.shards.append(name)
        meta = {"n_pairs": self.n_pairs, "shapes": {t: list(s) for t, s in self.shapes.items()}, "shards": self.shards}
        write_text(self.out_dir / INDEX_FILE, json.dumps(meta, indent=2))  # type: ignore[operator]

    def per_pair(self) -> dict[str, torch.Tensor]:
        """node type -> [P, *layout]: dense for ``"all"``, else sparse COO with the top_k entries of each pair."""
        if self.keep == "all":
            return self.dense
        pairs = torch.cat(self.top_pairs) if self.top_pairs else torch.zeros(0, dtype=torch.long)
        out = {}
        for t, shape in self.shapes.items():
            index = torch.cat(self.top_index[t]) if self.top_index[t] else torch.zeros(0, 0, dtype=torch.long)
            value = torch.cat(self.top_value[t]) if self.top_value[t] else torch.zeros(0, 0, dtype=self.dtype)
            rows = pairs[:, None].expand_as(index)  # [P, k]
            coords = torch.unravel_index(index.flatten(), shape)  # each [P·k]
            indices = torch.stack([rows.flatten(), *coords])  # [1 + len(layout), P·k]
            values = value.flatten()  # [P·k]
            out[t] = torch.sparse_coo_tensor(indices, values, (self.n_pairs, *shape), check_invariants=True).coalesce()
        return out

    def scores(self, aggregation: str) -> dict[str, torch.Tensor]:
        """Mean (``"mean"``) or mean absolute value (``"mean_abs"``) over all pairs: [*layout] per type.

        Only the aggregation given to the constructor, and not with ``keep="all"`` (aggregate ``per_pair()``).
        """
        if self.keep == "all" or aggregation != self.aggregation:
            raise ValueError(f"this sink keeps running sums for {self.aggregation!r} only (keep={self.keep!r})")
        return {t: (v / self.n_pairs).to(self.dtype) for t, v in self.total.items()}

    def info(self) -> dict[str, Any]:
        if self.keep == "all":
            return {}
        info: dict[str, Any] = {"keep": self.keep, "top_k": self.top_k}
        if self.keep == "disk":
            info["per_pair_dir"] = str(self.out_dir)
            info["per_pair_shards"] = list(self.shards)
        return info


def read_per_pair(out_dir: str | Path, node_type: str, pairs: list[int] | None = None) -> torch.Tensor:
    """Per-pair values of one node type streamed by ``keep="disk"``: [len(pairs) or P, *layout].

    Reads only the shards that hold the requested pairs; a missing shard is an error (never zeros).

    Example:
        >>> import atpstar, tempfile
        >>> model = atpstar.load_model("toy-ioi")
        >>> pairs = atpstar.tasks.ioi(model.tokenizer, 4, seed=0)
        >>> folder = tempfile.mkdtemp()
        >>> result = atpstar.attribute(model, pairs, method="atp", nodes=["neuron"], keep="disk", out_dir=folder)
        >>> atpstar.read_per_pair(folder, "neuron", pairs=[0, 3]).shape  # [2, L, T, M]
        torch.Size([2, 2, 15, 512])
    """
    folder = Path(out_dir)
    index_path = folder / INDEX_FILE
    if not index_path.exists():
        raise InputError(f"{folder} holds no per-pair shards ({INDEX_FILE} is missing)")
    meta = json.loads(index_path.read_text())
    if node_type not in meta["shapes"]:
        raise InputError(f"{folder} has no node type {node_type!r}; it holds {sorted(meta['shapes'])}")
    wanted = list(range(meta["n_pairs"])) if pairs is None else [int(p) for p in pairs]
    position = {p: i for i, p in enumerate(wanted)}
    out = torch.empty(len(wanted), *meta["shapes"][node_type])
    found = torch.zeros(len(wanted), dtype=torch.bool)
    for name in meta["shards"]:
        if not (folder / name).exists():
            raise InputError(f"{folder}: shard {name} listed in {INDEX_FILE} is missing; rerun with keep='disk'")
        with safe_open(str(folder / name), framework="pt") as shard:
            shard_pairs = shard.get_tensor("pairs").tolist()
            rows = [(i, position[p]) for i, p in enumerate(shard_pairs) if p in position]
            if not rows:
                continue
            values = shard.get_tensor(f"per_pair/{node_type}")
            out = out.to(values.dtype)
            for row, target in rows:
                out[target] = values[row]
                found[target] = True
    if not bool(found.all()):
        missing = [wanted[i] for i in torch.nonzero(~found)[:, 0].tolist()]
        raise InputError(f"{folder}: no shard holds pairs {missing[:10]} (the run was interrupted before them?)")
    return out


def per_pair_tensors(node_type: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """How ``Attribution.save`` stores one node type's per-pair values: dense, or sparse top-k as COO parts."""
    if not value.is_sparse:
        return {f"per_pair/{node_type}": value.contiguous()}
    value = value.coalesce()
    return {
        f"per_pair_top/{node_type}/indices": value.indices().contiguous(),  # [1 + len(layout), nnz]
        f"per_pair_top/{node_type}/values": value.values().contiguous(),  # [nnz]
        f"per_pair_top/{node_type}/shape": torch.tensor(value.shape),
    }


def per_pair_from(tensors: dict[str, torch.Tensor], node_type: str) -> torch.Tensor:
    """The inverse of ``per_pair_tensors``."""
    if f"per_pair/{node_type}" in tensors:
        return tensors[f"per_pair/{node_type}"]
    prefix = f"per_pair_top/{node_type}"
    shape = tuple(tensors[f"{prefix}/shape"].tolist())
    indices, values = tensors[f"{prefix}/indices"], tensors[f"{prefix}/values"]
    return torch.sparse_coo_tensor(indices, values, shape, check_invariants=True).coalesce()
