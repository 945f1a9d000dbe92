"""``Method`` base class and the registry every method module fills with ``@register``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .. import __version__
from ..cost import Cost
from ..errors import InputError
from ..model import Model, as_model
from ..nodes import NODE_TYPES, check_node_types
from ..pairs import PromptPairs, check_direction
from ..result import Attribution, aggregate


class Method:
    """One attribution method. Constructor arguments are its options (keyword-only, with defaults).

    Subclasses set the capability flags and implement ``_attribute``; ``attribute`` validates
    everything first, so no forward pass runs on bad input.
    """

    id: ClassVar[str] = ""
    node_types: ClassVar[tuple[str, ...]] = NODE_TYPES
    exact: ClassVar[bool] = False  # computes true effects rather than estimates
    needs_gradients: ClassVar[bool] = False
    seeded: ClassVar[bool] = False
    pairs_interact: ClassVar[bool] = False  # a pair's result depends on the other pairs in the call
    aggregation: ClassVar[str] = "mean_abs"
    distributable: ClassVar[bool] = False  # runs as work units on Ray workers (``workers=``)

    def get_options(self) -> dict[str, Any]:
        return dict(vars(self))

    def attribute(
        self,
        model: Any,
        pairs: PromptPairs,
        nodes: Any = NODE_TYPES,
        *,
        direction: str = "noising",
        progress: bool = False,
        workers: int | None = None,
        ray_address: str | None = None,
    ) -> Attribution:
        """Attribute the metric of ``pairs`` to every node of the requested types.

        Args:
            model: an ``atpstar.Model`` (from ``load_model``) or a ``transformers`` causal LM.
            pairs: the prompt pairs and their metric.
            nodes: node types, any of ``neuron``, ``query``, ``key``, ``value``, ``head``.
            direction: ``"noising"`` (patch noise into the clean run, the paper's) or ``"denoising"``
                (patch clean into the noise run; what TransformerLens' tools compute).
            progress: show a progress bar.
            workers: run the sweep as work units on this many Ray workers (methods with
                ``distributable``); None runs in-process.
            ray_address: the Ray cluster for ``workers``: None starts a local one, ``"auto"`` joins
                the running cluster, or an address such as ``"ray://head:10001"``.

        Returns:
            An ``Attribution`` with ``per_pair[t]`` of shape [P, *layout] for each node type.

        Raises:
            InputError: bad pairs, node types, direction, options or a model in training mode.
        """
        model = as_model(model)
        node_types = check_node_types(nodes)
        missing = [t for t in node_types if t not in self.node_types]
        if missing:
            raise InputError(
                f"method {self.id!r} does not support node types {missing}; it supports {list(self.node_types)}"
            )
        if not isinstance(pairs, PromptPairs):
            raise InputError(f"pairs must be an atpstar.PromptPairs; got {type(pairs).__name__}")
        check_direction(direction)
        model.check_ready(torch.cat([pairs.clean, pairs.noise]))
        self._validate(model, pairs, node_types)
        executor = None
        if workers is not None or ray_address is not None:
            if not self.distributable:
                raise InputError(
                    f"method {self.id!r} does not run on workers; drop workers=/ray_address= (methods that do: "
                    f"{', '.join(m for m, r in METHODS.items() if r.cls.distributable)})"
                )
            from ..distributed import executor_for

            executor = executor_for(model, workers, ray_address, progress)
        cost = Cost()
        if executor is None:
            per_pair, extras, info = self._attribute(model, pairs, node_types, direction, cost, progress)
        else:
            per_pair, extras, info = self._attribute_on(executor, model, pairs, node_types, direction, cost)
        return Attribution(
            method=self.id,
            options=self.get_options(),
            direction=direction,
            metric=pairs.metric_name,
            model_id=model.model_id,
            per_pair=per_pair,
            scores=aggregate(per_pair, self.aggregation),
            aggregation=self.aggregation,
            cost=cost,
            extras=extras,
            info={"atpstar_version": __version__, "n_pairs": pairs.n_pairs, "seq_len": pairs.seq_len, **info},
        )

    def _validate(self, model: Model, pairs: PromptPairs, node_types: list[str]) -> None:
        """Check method options against the model and pairs (before any pass)."""

    def _attribute(
        self, model: Model, pairs: PromptPairs, node_types: list[str], direction: str, cost: Cost, progress: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        raise NotImplementedError

    def _attribute_on(
        self, executor: Any, model: Model, pairs: PromptPairs, node_types: list[str], direction: str, cost: Cost
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        """``_attribute`` as work units run by ``executor`` (``atpstar.distributed``); same numbers."""
        raise NotImplementedError


@dataclass(frozen=True)
class Registered:
    """A registry entry: a method class with preset options; calling it builds the method."""

    cls: type[Method]
    presets: dict[str, Any] = field(default_factory=dict)

    def __call__(self, **options: Any) -> Method:
        clash = sorted(set(options) & set(self.presets))
        if clash:
            raise InputError(f"options {clash} are fixed by this method id; choose another method id instead")
        method = self.cls(**self.presets, **options)
        return method


METHODS: dict[str, Registered] = {}


def register(method_id: str, **presets: Any):  # type: ignore[no-untyped-def]
    """Class decorator: add ``cls`` to ``METHODS`` under ``method_id`` with preset options."""

    def decorate(cls: type[Method]) -> type[Method]:
        if method_id in METHODS:
            raise RuntimeError(f"method id {method_id!r} registered twice")
        METHODS[method_id] = Registered(_with_id(cls, method_id) if presets else cls, presets)
        if not presets:
            cls.id = method_id
        return cls

    return decorate


def _with_id(cls: type[Method], method_id: str) -> type[Method]:
    """A subclass that carries the preset id, so results name the computation that ran."""
    return type(cls.__name__, (cls,), {"id": method_id, "__module__": cls.__module__, "__doc__": cls.__doc__})


def build_method(method: str, **options: Any) -> Method:
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    try:
        return METHODS[method](**options)
    except TypeError as err:
        raise InputError(f"bad options for method {method!r}: {err}") from err
