"""``Verification``: the exact effects of the nodes an estimate ranked highest (made by ``verify``).

Shape letters: P pairs, N verified nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cost import Cost
from .errors import CorruptFileError
from .persist import bundle_base, load_bundle, save_bundle
from .spaces import Spaces, spaces_from_info

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

    Example:
        >>> import atpstar
        >>> model = atpstar.load_model("toy-ioi")
        >>> pairs = atpstar.tasks.ioi(model.tokenizer, 4, seed=0)
        >>> checked = atpstar.verify(model, pairs, atpstar.attribute(model, pairs, "atp", nodes=["head"]), budget=2)
        >>> checked
        Verification(n_verified=2, direction='noising', metric='logit_diff', cost=14.0 forward + 0.0 backward = 14.0 forward-equivalents)
        >>> checked.effects.shape  # [n_verified, P]
        torch.Size([2, 4])
        >>> {key: round(value, 3) if isinstance(value, float) else value for key, value in checked.to_rows()[0].items()}
        {'rank': 1, 'name': 'blocks.1.attn.hook_z[pos 14, head 1]', 'node_type': 'head', 'layer': 1, 'head': 1, 'pos': 14, 'estimate_score': 3.774, 'effect': -5.573}
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
        """The name each node's space gives it (TransformerLens-style; MIB's for edges)."""
        spaces = self.spaces()
        return [spaces.name(t, index) for t, index in self.nodes]

    def spaces(self) -> Spaces:
        """The node spaces of the verified nodes (rebuilt from ``info``, no model needed)."""
        return Spaces(spaces_from_info(self.info, self.node_types))

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per verified node, in verification order."""
        rows, spaces = [], self.spaces()
        for rank, ((t, index), name) in enumerate(zip(self.nodes, self.names), start=1):
            row: dict[str, Any] = {"rank": rank, "name": name, "node_type": t, **spaces.columns(t, index)}
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
