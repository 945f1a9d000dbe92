"""Verification: exact activation patching of nodes in the order an estimate ranks them (spec §8).

Estimators are pre-filters: ``verify`` takes their ranking (largest ``|score|`` first, across the
estimate's node types) and patches the nodes one by one, exactly, on every pair, until ``budget``
nodes are verified or the estimate's score falls below ``threshold``. Both stopping rules depend only
on the estimate, so the verified set is known up front and patching is batched by layer behind the
scenes; the result lists nodes in estimate order.
Cost: 2P full forwards (base and source runs), then one forward per verified node and pair started at
the node's layer, counted (L - l) / L.

Shape letters: P pairs, N verified nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cost import Cost
from .engine import element_bytes, prepare
from .errors import CorruptFileError, InputError
from .fingerprint import MODEL_FIELDS, check_identity, identity
from .model import as_model
from .nodes import NodeLayout, index_columns, node_name, node_shape, unit_and_pos
from .pairs import PromptPairs, check_direction
from .persist import bundle_base, load_bundle, save_bundle
from .progress import progress_bar
from .result import Attribution
from .sweeps.patching import patch_ranked
from .validate import batch_for_memory, check_batch_size, check_count, check_number, check_pairs_fit

KIND = "verification"


@dataclass
class Verification:
    """Exact effects of the nodes an estimate ranked highest, in its order.

    Attributes:
        nodes: ``(node_type, index)`` per verified node, index in the per-pair layout without the pair
            axis (``(layer, pos, neuron)`` for neurons, ``(layer, head, pos)`` otherwise).
        effects: [N, P] exact signed effect of each node on each pair.
        estimate_scores: [N] the estimate's score of each node (its ranking key is the absolute value).
        node_types: the estimate's node types (the population the verified nodes were drawn from).
        direction, metric, model_id: as in ``Attribution``.
        cost: passes run by the verification alone (not the estimate's).
        base_metric: [P] metric of the unpatched base run.
    """

    nodes: list[tuple[str, tuple[int, ...]]]
    effects: torch.Tensor
    estimate_scores: torch.Tensor
    node_types: list[str]
    direction: str
    metric: str
    model_id: str
    cost: Cost
    base_metric: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_verified(self) -> int:
        return len(self.nodes)

    @property
    def mean_effects(self) -> torch.Tensor:
        """[N] c(n) = mean over pairs of the exact effect."""
        return self.effects.mean(1)

    @property
    def names(self) -> list[str]:
        """TransformerLens-style name per verified node (MIB names for edges)."""
        if any(t == "edge" for t, _ in self.nodes):
            from .edges.graph import EdgeGraph, edge_node_name

            edge_names = EdgeGraph.from_description(self.info["edge_graph"]).edge_names
            return [
                edge_node_name(edge_names, index) if t == "edge" else node_name(t, index) for t, index in self.nodes
            ]
        return [node_name(t, index) for t, index in self.nodes]

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per verified node, in verification order."""
        rows = []
        for rank, ((t, index), name) in enumerate(zip(self.nodes, self.names), start=1):
            row: dict[str, Any] = {"rank": rank, "name": name, "node_type": t, **index_columns(t, index)}
            row["estimate_score"] = float(self.estimate_scores[rank - 1])
            row["effect"] = float(self.mean_effects[rank - 1])
            rows.append(row)
        return rows

    def to_parts(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON metadata, tensors) of this verification: what ``save`` writes and ``from_parts`` reads."""
        tensors = {
            "effects": torch.as_tensor(self.effects),  # [N, P]
            "estimate_scores": torch.as_tensor(self.estimate_scores),  # [N]
            "base_metric": torch.as_tensor(self.base_metric),  # [P]
        }
        meta = {
            "nodes": [[t, [int(i) for i in index]] for t, index in self.nodes],
            "names": self.names,
            "node_types": list(self.node_types),
            "direction": self.direction,
            "metric": self.metric,
            "model_id": self.model_id,
            "cost": self.cost.to_dict(),
            "info": self.info,
        }
        return meta, tensors

    @classmethod
    def from_parts(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str | Path) -> Verification:
        """The verification ``to_parts`` split; ``where`` names the file in the error.

        Raises:
            CorruptFileError: a field or tensor is missing or malformed.
        """
        try:
            return cls(
                nodes=[(t, tuple(int(i) for i in index)) for t, index in meta["nodes"]],
                effects=tensors["effects"],
                estimate_scores=tensors["estimate_scores"],
                node_types=list(meta["node_types"]),
                direction=meta["direction"],
                metric=meta["metric"],
                model_id=meta["model_id"],
                cost=Cost.from_dict(meta["cost"]),
                base_metric=tensors["base_metric"],
                info=meta["info"],
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptFileError(f"{where}: saved verification is incomplete ({err!r}); save it again") from err

    def save(self, path: str | Path) -> None:
        """Write ``NAME.safetensors`` (effects, estimate scores, base metric) and ``NAME.json`` (the rest), atomically.

        Args:
            path: ``NAME``, ``NAME.json`` or ``NAME.safetensors``; any other dot is part of the name.
        """
        meta, tensors = self.to_parts()
        save_bundle(path, KIND, meta, tensors)

    @classmethod
    def load(cls, path: str | Path) -> Verification:
        """Read a verification written by ``save`` (``path`` with or without ``.json``/``.safetensors``).

        Raises:
            InputError: no such files. CorruptFileError: truncated, corrupt, another kind of file (e.g.
                an estimate), another format version, or halves of two saves.
        """
        meta, tensors = load_bundle(path, KIND)
        return cls.from_parts(meta, tensors, bundle_base(path))

    @property
    def identity(self) -> dict[str, str] | None:
        """What made this verification (see ``atpstar.fingerprint``), or None if not recorded."""
        value = self.info.get("identity")
        return value if isinstance(value, dict) else None

    def __repr__(self) -> str:
        return (
            f"Verification(n_verified={self.n_verified}, direction={self.direction!r}, metric={self.metric!r}, "
            f"cost={self.cost})"
        )


def verify(
    model: Any,
    pairs: PromptPairs,
    estimate: Attribution,
    budget: int | None = None,
    threshold: float | None = None,
    direction: str | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    checkpoint: str | None = None,
) -> Verification:
    """Patch nodes exactly, one at a time, in the order of ``estimate`` (largest ``|score|`` first).

    Args:
        model: an ``atpstar.Model`` or a ``transformers`` causal LM.
        pairs: the prompt pairs to verify on (their layout must match the estimate's).
        estimate: any ``Attribution``; its ``scores`` give the order (``estimate.order()``).
        budget: verify at most this many nodes; None: no limit.
        threshold: verify only nodes with ``|score| >= threshold``; None: no limit. With neither, every
            node of the estimate is verified (exhaustive patching in estimate order).
        direction: ``"noising"`` or ``"denoising"``; None takes ``estimate.direction``.
        batch_size: patched forwards per batch; None fits a 1 GB budget.
        progress: show a progress bar.
        workers: verify on this many Ray workers, in windows of ranks (``pip install
            'atpstar[distributed]'``); None: in-process.
        ray_address: None starts a local Ray instance; ``"auto"`` joins a running cluster.
        checkpoint: a folder; each finished window of ranks is saved there, and a rerun with the same
            folder, model, pairs and estimate resumes from them (also in-process).

    Returns:
        ``Verification`` with ``nodes``, ``effects`` [N, P], ``mean_effects``, ``names``, ``cost``.

    Raises:
        InputError: bad estimate, budget, threshold, direction or batch size.
    """
    model = as_model(model)
    if not isinstance(estimate, Attribution):
        raise InputError(f"estimate must be an atpstar.Attribution (from attribute); got {type(estimate).__name__}")
    if not isinstance(pairs, PromptPairs):
        raise InputError(f"pairs must be an atpstar.PromptPairs; got {type(pairs).__name__}")
    direction = check_direction(estimate.direction if direction is None else direction)
    budget = None if budget is None else check_count("budget", budget, minimum=0)
    threshold = None if threshold is None else check_number("threshold", threshold, 0.0)
    batch_size = check_batch_size(batch_size)
    node_types = estimate.node_types
    if "edge" in node_types:  # edges: exact edge patching in estimate order (atpstar.edges.verify)
        from .edges.verify import verify_edges

        if node_types != ["edge"]:
            raise InputError("verify an edge attribution on its own: attribute(..., nodes=['edge']) separately")
        if workers is not None or ray_address is not None or checkpoint is not None:
            raise InputError("edges are verified in-process; drop workers=/ray_address=/checkpoint=")
        model.check_ready(torch.cat([pairs.clean, pairs.noise]))
        return verify_edges(model, pairs, estimate, budget, threshold, direction, batch_size, progress)  # type: ignore[no-any-return]
    for t in node_types:
        want = node_shape(t, model.sizes, pairs.seq_len)
        if tuple(estimate.scores[t].shape) != want:
            raise InputError(
                f"estimate scores for {t!r} have shape {tuple(estimate.scores[t].shape)}, but this model and these "
                f"pairs give {want}; verify with the model and prompt length the estimate was made for"
            )
    check_pairs_fit(model, pairs)
    current = identity(model, pairs, direction, node_types, "verify", {"budget": budget, "threshold": threshold})
    check_identity(
        estimate.identity,
        current,
        f"estimate ({estimate.method})",
        "Verify with the model, tokenizer, prompt pairs and metric the estimate was made with.",
        fields=[f for f in (*MODEL_FIELDS, "pairs", "metric") if estimate.identity is not None],
    )

    types, type_index, flat_index = estimate.order()
    layout = NodeLayout.like(estimate.scores, types)
    flat_scores = layout.flatten({t: estimate.scores[t].double() for t in types})  # [N] in layout order
    ranked_scores = flat_scores[layout.position(type_index, flat_index)]  # [N] in estimate order
    n_verify = len(ranked_scores)
    if threshold is not None:
        n_verify = int((ranked_scores.abs() >= threshold).sum())  # sorted by |score|: a prefix
    if budget is not None:
        n_verify = min(n_verify, budget)

    batch = batch_for_memory(batch_size, 1.0, element_bytes(model, pairs.seq_len))
    nodes = [layout.locate(int(p)) for p in layout.position(type_index[:n_verify], flat_index[:n_verify])]
    # Per verified node, in rank order: (type index, layer, head/kv-head/neuron, position), each [n].
    parts = torch.tensor([(index[0], *unit_and_pos(t, index)) for t, index in nodes], dtype=torch.long)
    layer_i, unit_i, pos_i = parts.reshape(n_verify, 3).unbind(1)  # [n, 3] -> 3 x [n]
    ranked = (type_index[:n_verify].clone(), layer_i, unit_i, pos_i)

    cost = Cost()
    info: dict[str, Any] = {}
    if workers is None and ray_address is None and checkpoint is None:
        cache = prepare(model, pairs, direction, node_types, cost)
        with progress_bar(n_verify * pairs.n_pairs, "verify", progress) as bar:
            effects = patch_ranked(model, cache, types, ranked, batch, cost, bar.update)
        base_metric = cache.base_metric
    else:
        from .distributed import executor_for
        from .distributed.sweeps import verify_on

        executor = executor_for(model, workers, ray_address, progress)
        effects, base_metric, info = verify_on(
            executor, model, pairs, types, direction, ranked, batch, checkpoint, cost
        )

    return Verification(
        nodes=nodes,
        effects=effects,
        estimate_scores=ranked_scores[:n_verify].clone(),
        node_types=list(node_types),
        direction=direction,
        metric=pairs.metric_name,
        model_id=model.model_id,
        cost=cost,
        base_metric=base_metric.detach().double().cpu(),
        info={
            "estimate_method": estimate.method,
            "budget": budget,
            "threshold": threshold,
            "n_nodes": int(len(ranked_scores)),
            **info,
            "identity": current,
            "estimate_identity": estimate.identity,
        },
    )
