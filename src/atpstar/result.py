"""``Attribution``: per-node results of one method on one set of prompt pairs.

Layouts per node type (see ``nodes``): ``per_pair[t]`` is [P, *layout], ``scores[t]`` is [*layout].
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .cost import Cost
from .errors import CorruptFileError, InputError
from .nodes import INDEX_COLUMNS, NodeLayout
from .persist import atomic_path, bundle_base, load_bundle, save_bundle
from .sink import per_pair_from, per_pair_tensors
from .spaces import Spaces, check_node_types, spaces_from_info

KIND = "attribution"


class RankedNode(NamedTuple):
    node_type: str
    index: tuple[int, ...]  # type: ignore[assignment]  # shadows tuple.index; the name users expect
    name: str
    score: float


@dataclass
class Attribution:
    """What a method found, with everything needed to trust and reproduce it.

    Attributes:
        method: method id (e.g. ``"atp*"``).
        options: the method's options as given.
        direction: ``"noising"`` or ``"denoising"``.
        metric: metric name.
        model_id: the model it ran on.
        per_pair: node type -> [P, *layout] signed per-pair effect or estimate.
        scores: node type -> [*layout] aggregate over pairs used for ranking (by absolute value).
        aggregation: how ``scores`` came from ``per_pair`` (``"mean"`` or ``"mean_abs"``).
        cost: passes run.
        extras: further tensors (e.g. Subsampling variances), keyed by ``"<name>/<node type>"``.
        info: further facts (seeds, completeness, package version).

    Example:
        >>> import atpstar, tempfile
        >>> model = atpstar.load_model("toy-ioi")
        >>> pairs = atpstar.tasks.ioi(model.tokenizer, 4, seed=0)
        >>> truth = atpstar.attribute(model, pairs, method="activation_patching", nodes=["head"])
        >>> truth.method, truth.aggregation, truth.scores["head"].shape  # scores: [L, H, T]
        ('activation_patching', 'mean', torch.Size([2, 4, 15]))
        >>> [(node.name, round(node.score, 3)) for node in truth.top(1)]
        [('blocks.1.attn.hook_z[pos 14, head 1]', -5.573)]
        >>> path = tempfile.mkdtemp() + "/truth"
        >>> truth.save(path)
        >>> atpstar.Attribution.load(path).top(1) == truth.top(1)
        True
    """

    method: str
    options: dict[str, Any]
    direction: str
    metric: str
    model_id: str
    per_pair: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    aggregation: str
    cost: Cost
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def node_types(self) -> list[str]:
        return list(self.scores)

    @property
    def n_pairs(self) -> int:
        return int(next(iter(self.per_pair.values())).shape[0])

    def order(
        self, node_types: list[str] | None = None, k: int | None = None
    ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Nodes by decreasing ``|scores|``: (types, type_index [N], flat_index [N]) into ``scores[types[i]].flatten()``.

        Ties keep the order of node types and layout (stable sort), so rankings are reproducible.
        """
        types = self.node_types if node_types is None else check_node_types(node_types)
        layout = NodeLayout.like(self.scores, types)
        flat = layout.flatten({t: self.scores[t].abs().double() for t in types})  # [N]
        ranked = torch.sort(flat, descending=True, stable=True).indices
        if k is not None:
            ranked = ranked[:k]
        type_index, flat_index = layout.split(ranked)
        return types, type_index, flat_index

    def top(self, k: int = 20, node_types: list[str] | None = None) -> list[RankedNode]:
        """The k nodes with the largest ``|scores|`` across the node types, largest first."""
        types, type_index, flat_index = self.order(node_types, k)
        spaces = self.spaces()
        ranked = []
        for type_i, position in zip(type_index.tolist(), flat_index.tolist()):
            node_type = types[type_i]
            shape = self.scores[node_type].shape
            index = tuple(int(i) for i in torch.unravel_index(torch.tensor(position), shape))
            name = spaces.name(node_type, index)
            ranked.append(RankedNode(node_type, index, name, float(self.scores[node_type][index])))
        return ranked

    def spaces(self) -> Spaces:
        """The node spaces of this result, rebuilt from ``info`` (no model needed): names, columns."""
        return Spaces(spaces_from_info(self.info, self.node_types))

    def edge_graph(self) -> Any:
        """The MIB/EAP-IG edge graph of an attribution with edges (``atpstar.edges.EdgeGraph``)."""
        from .spaces import EdgeNodes

        return EdgeNodes.from_info(self.info, []).graph  # type: ignore[attr-defined]

    def to_mib(
        self,
        path: str | Path,
        n_edges: int | None = None,
        prune: bool = True,
        *,
        absolute: bool = False,
        convention: str = "mib",
        batch_size: int = 20,
    ) -> Path:
        """Write the edge scores as a MIB circuit file (``.json`` or ``.pt``, by suffix), in MIB's sign and scale.

        The file holds what MIB's own code would store (``atpstar.edges.mib.mib_scores``, design record
        0019): MIB attributes the loss -(logit difference) averaged over a batch of ``batch_size``, so an
        estimate's score is -(per-pair mean score) / B and an exact effect's -(mean effect); higher is
        more important. Only noising results can be written.

        Args:
            path: the file to write.
            n_edges: mark the top ``n_edges`` edges as the circuit (pruned as MIB prunes); None marks
                every edge (MIB's evaluation picks its own circuit sizes from the scores).
            prune: prune the top-``n_edges`` circuit.
            absolute: rank by |score| (MIB's CMD ranking) instead of the signed score (its CPR ranking).
            convention: the head-sender convention the file must hold (0019); a post-norm result made with
                the other ``edge_convention`` is refused.
            batch_size: MIB's attribution batch size B.

        Example:
            >>> atpstar.attribute(model, pairs, method="atp*", nodes=["edge"], edge_convention="mib").to_mib("c.json")
        """
        from .edges.mib import attribution_to_mib

        return attribution_to_mib(
            self, path, n_edges, prune, absolute=absolute, convention=convention, batch_size=batch_size
        )

    def to_rows(self, k: int | None = None) -> list[dict[str, Any]]:
        """Tidy table: one row per node (top k, or all), with TransformerLens-style names."""
        k = sum(s.numel() for s in self.scores.values()) if k is None else k
        rows, spaces = [], self.spaces()
        for rank, node in enumerate(self.top(k), start=1):
            row: dict[str, Any] = {"rank": rank, "name": node.name, "node_type": node.node_type}
            row.update(spaces.columns(node.node_type, node.index))
            row["score"] = node.score
            rows.append(row)
        return rows

    def to_csv(self, path: str | Path, k: int | None = None) -> None:
        rows = self.to_rows(k)
        extra = [c for row in rows for c in row if c not in ("rank", "name", "node_type", "score", *INDEX_COLUMNS)]
        fields = ["rank", "name", "node_type", *INDEX_COLUMNS, *dict.fromkeys(extra), "score"]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    def save(self, path: str | Path) -> None:
        """Write ``NAME.safetensors`` (tensors) and ``NAME.json`` (everything else), atomically.

        Args:
            path: ``NAME``, ``NAME.json`` or ``NAME.safetensors``; any other dot is part of the name
                (``"d/seed.1"`` writes ``d/seed.1.json``).
        """
        tensors = {k: v for t, value in self.per_pair.items() for k, v in per_pair_tensors(t, value).items()}
        tensors.update({f"scores/{t}": v for t, v in self.scores.items()})
        tensors.update({f"extras/{k}": v for k, v in self.extras.items()})
        meta = {
            "method": self.method,
            "options": self.options,
            "direction": self.direction,
            "metric": self.metric,
            "model_id": self.model_id,
            "aggregation": self.aggregation,
            "cost": self.cost.to_dict(),
            "node_types": self.node_types,
            "info": self.info,
        }
        save_bundle(path, KIND, meta, tensors)

    @classmethod
    def load(cls, path: str | Path) -> Attribution:
        """Read an attribution written by ``save``.

        Raises:
            InputError: no such files. CorruptFileError: truncated, corrupt, another kind of file
                (e.g. a verification), another format version, or halves of two saves.
        """
        meta, tensors = load_bundle(path, KIND)
        try:
            per_pair = {t: per_pair_from(tensors, t) for t in meta["node_types"]}
            scores = {t: tensors[f"scores/{t}"] for t in meta["node_types"]}
            extras = {k[len("extras/") :]: v for k, v in tensors.items() if k.startswith("extras/")}
            return cls(
                meta["method"],
                meta["options"],
                meta["direction"],
                meta["metric"],
                meta["model_id"],
                per_pair,
                scores,
                meta["aggregation"],
                Cost.from_dict(meta["cost"]),
                extras,
                meta["info"],
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptFileError(
                f"{bundle_base(path)}: saved attribution is incomplete ({err!r}); save it again"
            ) from err

    @classmethod
    def concat(cls, parts: list[Attribution], info: dict[str, Any] | None = None) -> Attribution:
        """One attribution from the results of one method on consecutive blocks of pairs.

        ``per_pair`` and ``extras`` are concatenated on the pair axis, ``scores`` aggregated from the
        whole ``per_pair`` exactly as one call would, costs summed. In ``info``, counts (``n_pairs``,
        ``oom_retries``) are summed, facts equal in every part kept, lists (per-pair values such as
        ``base_metric``) concatenated, others taken from the first part; the parts' identities (of their own pairs) are dropped:
        pass the whole call's in ``info`` (``{"identity": ...}``), which overrides what is merged.

        Args:
            parts: results of the same method, options, direction, metric, model and node types, in
                pair order; dense ``per_pair`` (``keep="all"``).
            info: facts of the whole call (identity, memory plan), written over the merged ones.

        Raises:
            InputError: no parts, parts of different computations, or top-k (sparse) per-pair results.
        """
        if not parts:
            raise InputError("Attribution.concat needs at least one part")
        first = parts[0]
        fields = ("method", "options", "direction", "metric", "model_id", "aggregation", "node_types")
        for part in parts[1:]:
            differ = [f for f in fields if getattr(part, f) != getattr(first, f)]
            if differ:
                raise InputError(
                    f"Attribution.concat: the parts differ in {differ}; concatenate results of one method call "
                    "split over blocks of pairs"
                )
        if any(v.is_sparse for part in parts for v in part.per_pair.values()):
            raise InputError(
                "Attribution.concat: top-k per-pair results (keep='top'/'disk') cannot be merged exactly; use "
                "keep='all' to split a call over blocks of pairs"
            )
        per_pair = {t: torch.cat([part.per_pair[t] for part in parts]) for t in first.per_pair}  # [P, *layout]
        extras = {k: torch.cat([part.extras[k] for part in parts]) for k in first.extras}  # [P, ...]
        cost = Cost()
        for part in parts:
            cost = cost + part.cost
        merged = _merge_info([{k: v for k, v in part.info.items() if k != "identity"} for part in parts])
        return cls(
            first.method,
            dict(first.options),
            first.direction,
            first.metric,
            first.model_id,
            per_pair,
            aggregate(per_pair, first.aggregation),
            first.aggregation,
            cost,
            extras,
            {**merged, **(info or {})},
        )

    @property
    def identity(self) -> dict[str, str] | None:
        """What made this result (see ``atpstar.fingerprint``), or None for results built by hand."""
        value = self.info.get("identity")
        return value if isinstance(value, dict) else None

    def __repr__(self) -> str:
        shapes = ", ".join(f"{t}: {list(v.shape)}" for t, v in self.per_pair.items())
        return f"Attribution(method={self.method!r}, direction={self.direction!r}, metric={self.metric!r}, {shapes}, cost={self.cost})"


def aggregate(per_pair: dict[str, torch.Tensor], aggregation: str) -> dict[str, torch.Tensor]:
    """Scores from per-pair values: ``"mean"`` (signed, for exact effects) or ``"mean_abs"`` (estimates)."""
    if aggregation == "mean":
        return {t: v.mean(0) for t, v in per_pair.items()}
    if aggregation == "mean_abs":
        return {t: v.abs().mean(0) for t, v in per_pair.items()}
    raise InputError(f"unknown aggregation {aggregation!r}; choose 'mean' or 'mean_abs'")


# Facts that count something per pair or per pass: the whole call's is the sum of the parts'.
_COUNTS = frozenset({"n_pairs", "oom_retries", "units", "units_resumed", "units_retried", "prepare_runs"})


def _merge_info(infos: list[dict[str, Any]]) -> dict[str, Any]:
    """Facts of parts over blocks of pairs: counts summed, equal kept, lists concatenated, else the first's
    (a fact some parts lack is merged over the parts that have it)."""
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(k for info in infos for k in info):  # every key, in first-seen order
        values = [info[key] for info in infos if key in info]
        value = values[0]
        if key in _COUNTS:
            merged[key] = sum(values)
        elif all(v == value for v in values):
            merged[key] = value
        elif all(isinstance(v, list) for v in values):
            merged[key] = [x for v in values for x in v]
        else:
            merged[key] = value
    return merged
