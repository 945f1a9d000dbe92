"""Dictionary latents as a node space: each attached dictionary's latents and its error.

A dictionary named ``name`` (``atpstar.load_dictionary``, attached by ``attribute(..., dictionaries=[d])``)
owns two node types: ``name``, per pair [P, d_sae, T] (latent i at position t), and ``name + ".error"``,
per pair [P, T] (its reconstruction error at t). Names: ``blocks.6.hook_resid_post/sae-16k[latent 1234, pos 5]``
and ``blocks.6.hook_resid_post/sae-16k.error[pos 5]``; table columns ``layer``, ``index`` (the latent),
``pos`` and ``dictionary`` (its id, the Neuronpedia id when its files give one).

Methods run it through ``Method._attribute_latents(job, space)`` (engine ``"latents"``): exact patching and
the gradient estimators of ``atpstar.dictionaries``. A saved result keeps each dictionary's description
(``info["spaces"]["latents"]``), so its nodes can be named without the weights; fingerprints carry each
dictionary's content hash (``identity``).

Shape letters: P pairs, S d_sae, T positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from ..dictionaries import registry
from ..dictionaries.patching import Elements, patch_listed_latents, prepare_latents
from ..dictionaries.sites import check_fits, run_site
from ..engine import element_bytes
from ..errors import InputError
from .base import Advance, NodeSpace, known_types, register_space


def attach(dictionaries: Sequence[Any]) -> list[str]:
    """Attach dictionaries (``registry.attach``) whose names no other node space owns; their node types."""
    clash = [d.name for d in dictionaries if getattr(d, "name", None) in known_types()]
    if clash:
        raise InputError(f"dictionary names {clash} are built-in node types; pass name= to load_dictionary")
    return registry.attach(dictionaries)


@register_space
class LatentNodes(NodeSpace):
    """The latents and error nodes of attached dictionaries.

    Attributes:
        descriptions: dictionary name -> ``Dictionary.describe()`` (layout and names; no weights).
        dictionaries: dictionary name -> ``Dictionary`` (bound to a model; empty for a saved result's space).
    """

    kind: ClassVar[str] = "latents"
    engine: ClassVar[str] = "latents"
    in_process: ClassVar[bool] = True  # the dictionaries are attached in this process, not on Ray workers

    def __init__(self, node_types: Sequence[str], descriptions: Mapping[str, Mapping[str, Any]],
                 dictionaries: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        super().__init__(node_types)
        self.descriptions = {n: dict(v) for n, v in descriptions.items()}
        self.dictionaries = dict(dictionaries or {})

    @classmethod
    def owns(cls, node_type: str) -> bool:
        return registry.dictionary_name(node_type) is not None

    @classmethod
    def learn(cls, info: Mapping[str, Any]) -> None:
        registry.learn((info.get("spaces") or {}).get(cls.kind, {}))

    @classmethod
    def bind(cls, model: Any, node_types: Sequence[str], options: Mapping[str, Any]) -> NodeSpace:
        names = cls._names(node_types)
        dictionaries = {n: registry.attached(n) for n in names}
        described = {n: {**d.describe(), "n_layers": model.n_layers} for n, d in dictionaries.items()}
        return cls(node_types, described, dictionaries)

    @classmethod
    def from_info(cls, info: Mapping[str, Any], node_types: Sequence[str]) -> NodeSpace:
        described = {**registry.DESCRIBED, **((info.get("spaces") or {}).get(cls.kind, {}))}
        missing = [n for n in cls._names(node_types) if n not in described]
        if missing:
            raise InputError(f"this result does not describe dictionaries {missing}; it cannot name their latents")
        return cls(node_types, {n: described[n] for n in cls._names(node_types)})

    @staticmethod
    def _names(node_types: Sequence[str]) -> list[str]:
        return list(dict.fromkeys(str(registry.dictionary_name(t)) for t in node_types))

    def _about(self, node_type: str) -> dict[str, Any]:
        return self.descriptions[str(registry.dictionary_name(node_type))]

    # Layout and names ------------------------------------------------------------------------
    def axes(self, node_type: str) -> tuple[str, ...]:
        return ("pos",) if registry.is_error(node_type) else ("index", "pos")

    def shape(self, node_type: str, seq_len: int) -> tuple[int, ...]:
        return (seq_len,) if registry.is_error(node_type) else (int(self._about(node_type)["d_sae"]), seq_len)

    def name(self, node_type: str, index: tuple[int, ...]) -> str:
        hook = self._about(node_type)["hook"]
        if registry.is_error(node_type):
            return f"{hook}/{node_type}[pos {index[0]}]"
        return f"{hook}/{node_type}[latent {index[0]}, pos {index[1]}]"

    def columns(self, node_type: str, index: tuple[int, ...]) -> dict[str, Any]:
        about = self._about(node_type)
        latent = {} if registry.is_error(node_type) else {"index": index[0]}
        return {"layer": about["layer"], **latent, "pos": index[-1], "dictionary": about["id"]}

    def patch_share(self, node_type: str, seq_len: int, charged: bool = False) -> torch.Tensor:
        write = run_site(self._about(node_type)["output_hook"] or self._about(node_type)["hook"])
        n_layers = int(self._about(node_type)["n_layers"])
        share = torch.tensor((n_layers - write.layer) / n_layers, dtype=torch.float64)
        return share.expand(self.shape(node_type, seq_len))

    # Results and identity --------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return self.descriptions

    def identity(self) -> dict[str, str]:
        return registry.identity_of(self.node_types)

    def check_model(self, model: Any) -> None:
        for dictionary in self.dictionaries.values():
            check_fits(dictionary, model)

    # Execution -------------------------------------------------------------------------------
    def attribute(
        self, method: Any, job: Any
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        entry = getattr(method, "_attribute_latents", None)
        if entry is None:
            raise InputError(f"method {method.id!r} has no form for dictionary latents")
        per_pair, info = entry(job, self)
        wanted = {t: per_pair[t] for t in self.node_types}
        return wanted, {}, {**info, "spaces": {self.kind: self.describe()}}

    @property
    def ordered(self) -> list[Any]:
        """The bound dictionaries, in the order of their node types."""
        return [self.dictionaries[n] for n in self._names(self.node_types)]

    def element_bytes(self, job: Any) -> int:
        return element_bytes(job.model, job.seq_len)

    def elements(self, nodes: list[tuple[str, tuple[int, ...]]]) -> Elements:
        """The patching engine's node tuple for listed nodes (dictionary, latent or -1, pos)."""
        names = self._names(self.node_types)
        rows = [
            (names.index(str(registry.dictionary_name(t))), -1 if registry.is_error(t) else index[0], index[-1])
            for t, index in nodes
        ]
        table = torch.tensor(rows, dtype=torch.long).reshape(len(nodes), 3)  # [n, (dictionary, latent, pos)]
        return Elements(table[:, 0], table[:, 1], torch.zeros(len(nodes), dtype=torch.long), table[:, 2])

    def exact_effects(
        self, job: Any, nodes: list[tuple[str, tuple[int, ...]]], batch: int | None, advance: Advance | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cache = prepare_latents(job.model, job.pairs, job.direction, self.ordered, job.cost)
        effects = patch_listed_latents(job.model, cache, self.ordered, self.elements(nodes), batch or 1, job.cost,
                                       advance)  # fmt: skip
        return effects, cache.patch.base_metric
