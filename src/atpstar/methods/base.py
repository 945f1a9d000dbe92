"""``Method`` base class and the registry every method module fills with ``@register``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..cost import Cost
from ..errors import InputError
from ..fingerprint import identity
from ..job import Job
from ..memory import MemoryPlan, announce
from ..model import Model, as_model
from ..nodes import NODE_TYPES
from ..pairs import PromptPairs, check_direction
from ..pairsets import as_pairs, check_positions, each_group, group_folder, merge_groups
from ..result import Attribution, aggregate
from ..sink import PerPairSink
from ..spaces import BUILTIN_TYPES, Spaces, check_node_types, space_class, spaces_for
from ..validate import check_finite_options, check_pairs_fit, warn_non_finite
from ..version import __version__


class Method:
    """One attribution method. Constructor arguments are its options (keyword-only, with defaults).

    Subclasses declare their capabilities (the class variables below), implement ``_attribute`` and
    ``expected_cost``; ``attribute`` validates everything first, so no forward pass runs on bad
    input. ``atpstar.testing.check_method(cls)`` runs the contract every registered method meets.
    """

    id: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for method tables (``atpstar methods``); set per id by ``register``
    node_types: ClassVar[tuple[str, ...]] = NODE_TYPES  # node types it can score
    exact: ClassVar[bool] = False  # computes true effects (usable as ground truth) rather than estimates
    needs_gradients: ClassVar[bool] = False  # runs backward passes through the model
    seeded: ClassVar[bool] = False  # results depend on a ``seed`` option
    pairs_interact: ClassVar[bool] = False  # a pair's result depends on the other pairs in the call
    aggregation: ClassVar[str] = "mean_abs"  # how ``scores`` come from ``per_pair`` (``result.aggregate``)
    cost_is_bound: ClassVar[bool] = False  # ``expected_cost`` is an upper bound, not the exact count
    distributable: ClassVar[bool] = False  # runs as work units on Ray workers (``workers=``)
    # entry points it implements, by node-space engine: "sites" (``_attribute``), "edges" (``_attribute_edges``)
    engines: ClassVar[tuple[str, ...]] = ("sites",)

    def expected_cost(self, model: Model, pairs: PromptPairs, node_types: list[str], info: Mapping[str, Any]) -> Cost:
        """The documented cost of a call, in passes over single prompts (see ``atpstar.cost``).

        Args:
            model, pairs, node_types: as given to ``attribute``.
            info: the result's ``info`` (methods whose work adapts to the data count it there).

        Returns:
            The exact ``Cost`` the call reports, or an upper bound when ``cost_is_bound``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not document its cost (expected_cost)")

    # Options are annotated class attributes with defaults, declared on the method class (one comment or a
    # docstring line each); the constructor takes them as keywords and stores them unchanged.
    fixed_options: ClassVar[frozenset[str]] = frozenset()  # inherited options this class fixes (class attributes)

    def __init__(self, **options: Any) -> None:
        names = self.option_names()
        unknown = [name for name in options if name not in names]
        if unknown:
            raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {unknown[0]!r}")
        for name in names:
            setattr(self, name, options.get(name, getattr(type(self), name)))

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The options of this method class, in declaration order (base classes first)."""
        names: dict[str, None] = {}
        for klass in reversed(cls.__mro__):
            for name, annotation in vars(klass).get("__annotations__", {}).items():
                if not str(annotation).startswith(("ClassVar", "typing.ClassVar")) and hasattr(klass, name):
                    names[name] = None
        return tuple(name for name in names if name not in cls.fixed_options)

    def get_options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.option_names()}

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as (id, options): the classes of preset ids are made at registration, not importable.
        return (_rebuild, (self.id, self.get_options()))

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
            pairs: the prompt pairs and their metric; a ``PairSet`` (prompts of several lengths) runs group by
                group, its node types summed over positions (edges) merged on the pair axis.
            nodes: node types, any of ``neuron``, ``query``, ``key``, ``value``, ``head``, and ``edge``
                (the MIB/EAP-IG edge graph, ``per_pair["edge"]`` [P, N] in ``atpstar.edge_names`` order,
                [P, N, T] with the option ``edge_positions=True`` (``check_edge_positions``);
                methods with edges: ``activation_patching``, ``atp``, ``atp+qkfix``, ``atp+graddrop``,
                ``atp*``, ``atp+ig``).
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
        self.check_supported(node_types, on_workers=workers is not None or ray_address is not None)
        pairs = as_pairs(pairs)
        check_direction(direction)
        check_pairs_fit(model, pairs)
        check_finite_options(f"method {self.id!r} option ", self.get_options())
        self._validate(model, pairs, node_types)
        spaces = Spaces(spaces_for(model, node_types, self.get_options()))
        for space in spaces:
            space.check_model(model)
        check_positions(pairs, {t: space.pos_axis(t) for space in spaces for t in space.node_types})
        sites = [t for space in spaces if space.engine == "sites" for t in space.node_types]
        plan = self.memory_plan(model, pairs.n_pairs, pairs.seq_len, sites) if sites else None
        if plan is not None:
            announce(plan, progress)
        executor = self._executor(model, workers, ray_address, progress)
        if executor is not None and not self.distributable:  # whole calls on blocks of pairs, merged
            return _by_pair_blocks(self, executor, model, pairs, node_types, direction, plan)
        job = Job(model, pairs, direction, Cost(), progress)
        per_pair: dict[str, torch.Tensor] = {}
        extras: dict[str, torch.Tensor] = {}
        info: dict[str, Any] = {}
        kept_scores: dict[str, torch.Tensor] = {}
        for space in spaces:
            results, more_extras, more_info = _by_group(self, space, job, executor)
            if isinstance(results, PerPairSink):  # kept batch by batch (keep="top"/"disk"): exact running scores
                kept_scores.update(results.scores(self.aggregation))
                more_info = {**results.info(), **more_info}
                results = results.per_pair()
            per_pair.update(results)
            extras.update(more_extras)
            info.update(more_info)
        cost = job.cost
        warn_non_finite(per_pair, f"the {self.id} result")
        options = self.get_options()
        made_by = identity(model, pairs, direction, node_types, self.id, options)
        return Attribution(
            method=self.id,
            options=options,
            direction=direction,
            metric=pairs.metric_name,
            model_id=model.model_id,
            per_pair=per_pair,
            scores=_scores(per_pair, kept_scores, self.aggregation),
            aggregation=self.aggregation,
            cost=cost,
            extras=extras,
            info={
                "atpstar_version": __version__,
                "n_pairs": pairs.n_pairs,
                "seq_len": pairs.seq_len,
                **({"memory": plan.to_dict()} if plan is not None else {}),
                **info,
                "identity": made_by,
            },
        )

    def check_supported(self, node_types: list[str], on_workers: bool = False) -> None:
        """Refuse node types this method cannot run, before any model is loaded or pass is made.

        Args:
            node_types: checked node-type names (``check_node_types``).
            on_workers: the call asks for ``workers=``/``ray_address=``: a method runs there with its own
                work units (``distributable``: site nodes), or as whole calls on blocks of pairs
                (``runs_on_workers``: every space, edges included).

        Raises:
            InputError: a node type of a space this method has no entry point for (or not in its
                ``node_types``); on workers, a space that runs in-process only or a method that does
                not run on workers.
        """
        missing = [
            t for t in node_types
            if space_class(t).engine not in self.engines or (t not in self.node_types and t in BUILTIN_TYPES)
        ]  # fmt: skip
        if missing:
            raise InputError(
                f"method {self.id!r} does not support node types {missing} (it has no {'/'.join(missing)} form); "
                f"it supports {list(self.node_types)}"
            )
        if not on_workers:
            return
        if not runs_on_workers(type(self)):
            raise InputError(
                f"method {self.id!r} does not run on workers; drop workers=/ray_address= (methods that do: "
                f"{', '.join(m for m, r in METHODS.items() if runs_on_workers(r.cls))})"
            )
        not_sites = [t for t in node_types if space_class(t).engine != "sites"]
        local = [t for t in node_types if space_class(t).in_process]  # they need this process (attached dictionaries)
        refused = local or (not_sites if self.distributable else [])  # its own work units are site sweeps
        if refused:
            raise InputError(
                f"{refused} nodes run in-process only; ask for them in a call without workers=/ray_address="
            )

    def _executor(self, model: Model, workers: int | None, ray_address: str | None, progress: bool) -> Any:
        """The executor of a ``workers=``/``ray_address=`` call (None: in-process); ``check_supported`` ran first."""
        if workers is None and ray_address is None:
            return None
        from ..distributed import executor_for

        return executor_for(model, workers, ray_address, progress)

    def _validate(self, model: Model, pairs: PromptPairs, node_types: list[str]) -> None:
        """Check method options against the model and pairs (before any pass)."""

    def memory_plan(self, model: Model, n_pairs: int, seq_len: int, node_types: list[str]) -> MemoryPlan | None:
        """Predicted peak memory and the batch that fits ``memory_gb`` (None: this method makes no prediction).

        Raises:
            InputError: what the run must hold does not fit in ``memory_gb``.
        """
        return None

    def _attribute(
        self, model: Model, pairs: PromptPairs, node_types: list[str], direction: str, cost: Cost, progress: bool
    ) -> tuple[dict[str, torch.Tensor] | PerPairSink, dict[str, torch.Tensor], dict[str, Any]]:
        """(per_pair, or a sink that received it batch by batch; extras; info)."""
        raise NotImplementedError

    def _attribute_on(
        self, executor: Any, model: Model, pairs: PromptPairs, node_types: list[str], direction: str, cost: Cost
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        """``_attribute`` as work units run by ``executor`` (``atpstar.distributed``); same numbers."""
        raise NotImplementedError

    def _attribute_in_process(
        self, model: Model, pairs: PromptPairs, node_types: list[str], direction: str, cost: Cost, progress: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        """``_attribute`` of a method with work units of its own: the same units on the in-process executor
        (one code path per sweep; set ``_attribute = Method._attribute_in_process``)."""
        from ..distributed import LocalExecutor

        return self._attribute_on(LocalExecutor(model, progress), model, pairs, node_types, direction, cost)

    def _attribute_edges(
        self, model: Model, pairs: PromptPairs, direction: str, cost: Cost, progress: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        """Edge results [P, N], per-pair extras by name (kept as ``"<name>/edge"``) and facts for ``info``."""
        raise NotImplementedError


def _by_group(
    method: Method, space: Any, job: Job, executor: Any = None
) -> tuple[Any, dict[str, torch.Tensor], dict[str, Any]]:
    """``space.attribute`` (on ``executor``: the method's work units) per equal-length group, in example order."""

    def run(group: Job) -> tuple[Any, dict[str, torch.Tensor], dict[str, Any]]:
        own = _for_group(method, job.pairs, group.pairs)
        if executor is None:
            return space.attribute(own, group)
        return own._attribute_on(executor, group.model, group.pairs, list(space.node_types), group.direction, group.cost)

    return merge_groups(job.pairs, each_group(job, run))


def _for_group(method: Method, pairs: PromptPairs, group: PromptPairs) -> Method:
    """``method`` for one group: its ``checkpoint`` folder one per length (``pairsets.group_folder``)."""
    folder = getattr(method, "checkpoint", None)
    own = group_folder(folder, pairs, group)
    return method if own == folder else _rebuild(method.id, {**method.get_options(), "checkpoint": own})


def runs_on_workers(cls: type[Method]) -> bool:
    """A method runs on workers with its own work units (``distributable``), or as whole calls on blocks
    of pairs when a pair's result depends on nothing else in the call (not ``pairs_interact``, not
    ``seeded``: a seeded method's draws follow the pair's place in the call)."""
    return cls.distributable or not (cls.pairs_interact or cls.seeded)


def _by_pair_blocks(
    method: Method,
    executor: Any,
    model: Model,
    pairs: PromptPairs,
    node_types: list[str],
    direction: str,
    plan: MemoryPlan | None,
) -> Attribution:
    """``method.attribute`` as whole calls on blocks of pairs run by ``executor``, merged (``Attribution.concat``)."""
    from ..distributed.sweeps import pair_blocks_on

    options = method.get_options()
    results, run_info = pair_blocks_on(executor, method, model, pairs, node_types, direction)
    parts = []
    for result in results:  # blocks in pair order
        per_pair = {t: result.tensors[f"per_pair/{t}"] for t in node_types}  # [P_block, *layout]
        extras = {k[len("extras/") :]: v for k, v in result.tensors.items() if k.startswith("extras/")}
        scores = aggregate(per_pair, method.aggregation)
        meta = (method.id, options, direction, pairs.metric_name, model.model_id)
        parts.append(Attribution(*meta, per_pair, scores, method.aggregation, result.cost, extras, result.meta["info"]))
    made_by = identity(model, pairs, direction, node_types, method.id, options)
    memory = {"memory": plan.to_dict()} if plan is not None else {}
    return Attribution.concat(parts, {**run_info, "n_pairs": pairs.n_pairs, **memory, "identity": made_by})


def _rebuild(method_id: str, options: dict[str, Any]) -> Method:
    """The method ``method_id`` with ``options`` (presets included): how methods travel to workers."""
    return METHODS[method_id].cls(**options)


def check_edge_positions(edge_positions: object, node_types: list[str]) -> None:
    """The ``edge_positions`` option: position-resolved edges, ``per_pair["edge"]`` [P, N, T].

    Edge s -> r at position t carries only the sender's output difference at residual position t (the
    sender's position, as EAP-IG's position-resolved graphs); the last axis is t. Only linear estimates
    (EAP, EAP-IG, the QK fix at query receivers) sum over t to the position-summed result; exact
    patching, GradDrop (|.| per position) and the QK fix at key receivers (one key changed at a time) do not.
    """
    if not isinstance(edge_positions, bool):
        raise InputError(f"edge_positions must be True or False; got {edge_positions!r}")
    if edge_positions and not any(space_class(t).engine == "edges" for t in node_types):
        raise InputError(f"edge_positions=True applies to edges; add 'edge' to nodes (got {node_types})")


def _scores(
    per_pair: dict[str, torch.Tensor], kept: dict[str, torch.Tensor], aggregation: str
) -> dict[str, torch.Tensor]:
    """Aggregate ``per_pair``, except node types whose exact scores a sink kept (their per_pair is top-k only)."""
    rest = aggregate({t: v for t, v in per_pair.items() if t not in kept}, aggregation)
    return {t: kept[t] if t in kept else rest[t] for t in per_pair}


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


def register(method_id: str, *, summary: str, **presets: Any):  # type: ignore[no-untyped-def]
    """Class decorator: add ``cls`` to ``METHODS`` under ``method_id`` with preset options.

    Args:
        method_id: the id users pass as ``method=``.
        summary: one line saying what the computation does, for method tables.
        presets: options this id fixes (several ids may share one class).
    """

    def decorate(cls: type[Method]) -> type[Method]:
        if method_id in METHODS:
            raise RuntimeError(f"method id {method_id!r} registered twice")
        METHODS[method_id] = Registered(_with_id(cls, method_id, summary) if presets else cls, presets)
        if not presets:
            cls.id, cls.summary = method_id, summary
        return cls

    return decorate


def _with_id(cls: type[Method], method_id: str, summary: str) -> type[Method]:
    """A subclass that carries the preset id, so results name the computation that ran."""
    namespace = {"id": method_id, "summary": summary, "__module__": cls.__module__, "__doc__": cls.__doc__}
    return type(cls.__name__, (cls,), namespace)


def build_method(method: str, **options: Any) -> Method:
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    try:
        return METHODS[method](**options)
    except TypeError as err:
        raise InputError(f"bad options for method {method!r}: {err}") from err
