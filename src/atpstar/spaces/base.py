"""The node-space protocol: what every kind of node tells the rest of the package.

A *node space* owns one or more node-type names (the keys of ``Attribution.per_pair``) and answers,
for its own types only, every question the verbs ask: the per-pair layout (axes and shape for a
prompt length), names and table columns of single nodes, what a saved result stores to name its
nodes later without the model (``describe``), what the identity fingerprint hashes (``identity``),
whether a model is supported, and the two execution faces — run a method over its nodes
(``attribute``) and patch a list of single nodes exactly (``exact_effects``).

The verbs (``attribute``, ``verify``, the bound, ``find``, ``evaluate``), results, plots and the CLI
iterate spaces; none of them tests a node-type name. A new kind of node is one ``NodeSpace``
subclass plus ``register_space(cls)``.

Two constructors: ``bind(model, node_types, options)`` for a computation, and
``from_info(info, node_types)`` for a saved result (``info["spaces"][cls.kind]`` is what
``describe`` returned; older results may lack it, and a space rebuilds itself from what they hold).

Shape letters: P pairs, N nodes (of one call), T positions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import InputError

if TYPE_CHECKING:  # types only: the protocol sits below the methods and the job that use it
    from ..job import Job

# advance(n): called as n more (node, pair) effects are done (a progress bar's ``update``).
Advance = Callable[[int], Any]


class NodeSpace(ABC):
    """Nodes of one kind, bound to a model (or to a saved result's description).

    Attributes:
        kind: registry key, and the key of this space's description in results' ``info["spaces"]``.
        engine: the kind of method entry point that runs it; spaces sharing an engine share methods.
        node_types: the node-type names this instance holds, in canonical order.
    """

    kind: ClassVar[str] = ""
    engine: ClassVar[str] = ""  # which method entry point runs it ("sites", "edges"; ``Method.engines``)
    in_process: ClassVar[bool] = False  # its nodes need state of this process (e.g. attached dictionaries): no workers

    def __init__(self, node_types: Sequence[str]) -> None:
        self.node_types = tuple(node_types)

    # Registration ------------------------------------------------------------------------------------
    @classmethod
    def on_register(cls) -> None:
        """Called by ``register_space`` (e.g. to make the space's rows known to the engines)."""

    @classmethod
    def on_unregister(cls) -> None:
        """Called by ``unregister_space``: undo ``on_register``."""

    # Which names a space answers to --------------------------------------------------------------
    @classmethod
    @abstractmethod
    def owns(cls, node_type: str) -> bool:
        """True when ``node_type`` names nodes of this space."""

    @classmethod
    def known_types(cls) -> tuple[str, ...]:
        """The names it owns that can be listed without a model (for error messages and the CLI)."""
        return ()

    @classmethod
    def learn(cls, info: Mapping[str, Any]) -> None:
        """Recognise node-type names chosen at run time (e.g. dictionaries) from a saved result's ``info``;
        ``spaces_from_info`` calls it on every registered space before grouping the result's node types."""

    @classmethod
    @abstractmethod
    def bind(cls, model: Any, node_types: Sequence[str], options: Mapping[str, Any]) -> NodeSpace:
        """This space's nodes ``node_types`` on ``model``; ``options`` are the method's options."""

    @classmethod
    @abstractmethod
    def from_info(cls, info: Mapping[str, Any], node_types: Sequence[str]) -> NodeSpace:
        """The space of a saved result, from its ``info`` (no model needed)."""

    # Layout and names ------------------------------------------------------------------------------
    @abstractmethod
    def axes(self, node_type: str) -> tuple[str, ...]:
        """Index names of the per-pair layout, in order (also the table columns)."""

    @abstractmethod
    def shape(self, node_type: str, seq_len: int) -> tuple[int, ...]:
        """Per-pair layout of ``node_type`` for prompts of ``seq_len`` tokens."""

    def pos_axis(self, node_type: str) -> int | None:
        """Axis of the position in the layout; None when the nodes are summed over positions."""
        axes = self.axes(node_type)
        return axes.index("pos") if "pos" in axes else None

    @abstractmethod
    def name(self, node_type: str, index: tuple[int, ...]) -> str:
        """The name users know for one node (TransformerLens- or MIB-style)."""

    def columns(self, node_type: str, index: tuple[int, ...]) -> dict[str, Any]:
        """A node's index as table columns, e.g. ``{"layer": 3, "head": 2, "pos": 5}`` (ints, or labels such
        as a dictionary's id)."""
        return dict(zip(self.axes(node_type), index))

    def patch_share(self, node_type: str, seq_len: int, charged: bool = False) -> torch.Tensor:
        """[*layout] the share of a full forward that patching each node alone costs, as the engine counts it
        ((L - l) / L for a node at layer l). ``charged``: at least 1 / L, as comparisons on a log scale charge
        every verification something.

        The default reads the layer from the first axis, which must then be ``"layer"``.
        """
        shape = self.shape(node_type, seq_len)
        if self.axes(node_type)[0] != "layer":
            raise NotImplementedError(f"{type(self).__name__} must say what patching one {node_type} node costs")
        n_layers = shape[0]
        layers = torch.arange(n_layers, dtype=torch.float64).reshape(-1, *([1] * (len(shape) - 1)))
        return ((n_layers - layers) / n_layers).expand(shape)  # >= 1 / L: charged or not

    # Results and identity ----------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """JSON facts a result keeps to rebuild this space with ``from_info`` (empty: nothing needed)."""
        return {}

    def identity(self) -> dict[str, str]:
        """What fingerprints must hash beyond the model and pairs (e.g. a dictionary's content hash)."""
        return {}

    def check_layout(self, node_type: str, scores: torch.Tensor, seq_len: int) -> None:
        """Refuse a result whose layout for ``node_type`` is not this space's on this model."""
        want = self.shape(node_type, seq_len)
        if tuple(scores.shape) != want:
            raise InputError(
                f"scores for {node_type!r} have shape {tuple(scores.shape)}, but this model and these pairs give "
                f"{want}; use the model and prompt length the result was made for"
            )

    # Before the first pass ---------------------------------------------------------------------
    def check_model(self, model: Any) -> None:
        """Refuse a model this space cannot work on (called before any pass)."""

    # Execution ---------------------------------------------------------------------------------
    @abstractmethod
    def attribute(
        self, method: Any, job: Job
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        """Run ``method`` over this space's nodes: (per_pair, or a sink; extras; info)."""

    def pullback(self, node_type: str, diff: torch.Tensor, grad: torch.Tensor, scale: Any = None) -> torch.Tensor:
        """Per-node AtP scores from a site's source - base difference and ∂L/∂site ([b, *site] each).

        Spaces served by the gradient step's site consumers implement it (``SiteNodes``); spaces with their
        own estimators (edges: sender differences against receiver-input gradients) need not.
        """
        raise NotImplementedError(f"{type(self).__name__} scores its nodes with its own estimators")

    @abstractmethod
    def element_bytes(self, job: Job) -> int:
        """Memory of one patched forward element of ``exact_effects`` (what the batch planner divides by)."""

    def pair_bytes(self, job: Job) -> int:
        """Memory ``exact_effects`` holds per pair for the whole call (its prepared base and source runs).

        ``verify`` patches the pairs in blocks whose share fits half of ``memory_gb``. The default counts
        the base residual stream at every layer, twice (base and source); spaces that keep more say so.
        """
        sizes = job.model.sizes
        return 2 * (sizes.n_layers + 1) * job.seq_len * sizes.d_model * torch.finfo(job.model.dtype).bits // 8

    @abstractmethod
    def exact_effects(
        self, job: Job, nodes: list[tuple[str, tuple[int, ...]]], batch: int | None, advance: Advance | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact effects of patching each listed node alone: ([n, P] float64, base metric [P]).

        ``batch`` is the patched forwards per batch (None: the space's own default).
        """


# The registry: space classes in the order their node types are listed.
SPACES: list[type[NodeSpace]] = []


def register_space(cls: type[NodeSpace]) -> type[NodeSpace]:
    """Add a space class (usable as a decorator). A name two spaces own is refused."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__}.kind must name the space")
    if any(other.kind == cls.kind for other in SPACES):
        raise ValueError(f"a node space of kind {cls.kind!r} is registered already")
    clash = [t for t in cls.known_types() if any(other.owns(t) for other in SPACES)]
    if clash:
        raise ValueError(f"node types {clash} belong to another registered space")
    cls.on_register()
    SPACES.append(cls)
    return cls


def unregister_space(cls: type[NodeSpace]) -> None:
    """Remove a registered space (tests that add a space for their own duration)."""
    if cls not in SPACES:
        raise ValueError(f"{cls.__name__} is not registered")
    SPACES.remove(cls)
    cls.on_unregister()


def space_class(node_type: str) -> type[NodeSpace]:
    """The space class that owns ``node_type``; an unknown name is a clear error."""
    for cls in SPACES:
        if cls.owns(node_type):
            return cls
    raise InputError(f"unknown node type {node_type!r}; choose from {list(known_types())}")


def known_types() -> tuple[str, ...]:
    """Every node-type name the registered spaces can list without a model."""
    return tuple(t for cls in SPACES for t in cls.known_types())


def check_node_types(node_types: object) -> list[str]:
    """Validate node-type names and return them as a list: spaces in registry order, each in its order."""
    if isinstance(node_types, str):
        node_types = [node_types]
    if not isinstance(node_types, (list, tuple)) or not node_types:
        raise InputError(f"nodes must be a non-empty list of node types from {list(known_types())}; got {node_types!r}")
    if any(not isinstance(t, str) for t in node_types):
        raise InputError(f"node types are names (strings) from {list(known_types())}; got {list(node_types)!r}")
    unknown = [t for t in node_types if not any(cls.owns(t) for cls in SPACES)]
    if unknown:
        raise InputError(f"unknown node type(s) {unknown}; choose from {list(known_types())}")
    ordered = []
    for cls in SPACES:
        listed = cls.known_types()
        mine = [t for t in node_types if cls.owns(t)]
        ordered += [t for t in listed if t in mine] + [t for t in dict.fromkeys(mine) if t not in listed]
    return ordered


def _grouped(node_types: Sequence[str]) -> list[tuple[type[NodeSpace], list[str]]]:
    groups: dict[type[NodeSpace], list[str]] = {}
    for t in check_node_types(list(node_types)):
        groups.setdefault(space_class(t), []).append(t)
    return list(groups.items())


def spaces_for(model: Any, node_types: Sequence[str], options: Mapping[str, Any] | None = None) -> list[NodeSpace]:
    """The spaces holding ``node_types``, bound to ``model`` (one per space kind, registry order)."""
    return [cls.bind(model, types, options or {}) for cls, types in _grouped(node_types)]


def spaces_from_info(info: Mapping[str, Any], node_types: Sequence[str]) -> list[NodeSpace]:
    """The spaces of a saved result (``info`` as results keep it), without a model."""
    for cls in SPACES:
        cls.learn(info)
    return [cls.from_info(info, types) for cls, types in _grouped(node_types)]


class Spaces:
    """Several spaces answering by node-type name: the view results and verbs use.

    Example:
        >>> spaces = Spaces(spaces_from_info(result.info, result.node_types))  # doctest: +SKIP
        >>> spaces.name("head", (3, 2, 5))  # doctest: +SKIP
        'blocks.3.attn.hook_z[pos 5, head 2]'
    """

    def __init__(self, spaces: Sequence[NodeSpace]) -> None:
        self.spaces = list(spaces)
        self._of = {t: space for space in self.spaces for t in space.node_types}

    def __iter__(self) -> Any:
        return iter(self.spaces)

    @property
    def node_types(self) -> list[str]:
        return list(self._of)

    def of(self, node_type: str) -> NodeSpace:
        if node_type not in self._of:
            raise InputError(f"node type {node_type!r} is not among {self.node_types}")
        return self._of[node_type]

    def name(self, node_type: str, index: tuple[int, ...]) -> str:
        return self.of(node_type).name(node_type, index)

    def columns(self, node_type: str, index: tuple[int, ...]) -> dict[str, Any]:
        return self.of(node_type).columns(node_type, index)
