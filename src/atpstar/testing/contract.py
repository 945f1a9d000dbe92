"""The checks of the method contract (``check_method``), each a function of a ``Contract``."""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..cost import Cost
from ..errors import InputError
from ..methods.base import METHODS, Method, Registered
from ..model import Model
from ..nodes import NODE_TYPES
from ..pairs import PromptPairs
from ..result import Attribution
from ..spaces import check_node_types, known_types, space_class, spaces_for
from ..version import __version__
from .fixtures import assert_unchanged, snapshot, tiny_model, tiny_pairs

MethodLike = str | type[Method] | Registered  # a method id, a ``METHODS`` entry or a ``Method`` subclass


@dataclass
class Contract:
    """One method on one model and prompt set; ``result`` is computed once and shared by the checks."""

    entry: Registered
    model: Model
    pairs: PromptPairs
    nodes: list[str] | None = None  # node types to check (None: the built-in site types the method scores)
    _result: Attribution | None = field(default=None, repr=False)

    @property
    def cls(self) -> type[Method]:
        return self.entry.cls

    @property
    def node_types(self) -> list[str]:
        if self.nodes is not None:
            return check_node_types(self.nodes)
        return [t for t in NODE_TYPES if t in self.cls.node_types]

    def build(self) -> Method:
        return self.entry()

    def run(self, pairs: PromptPairs | None = None, **kwargs: Any) -> Attribution:
        return self.build().attribute(self.model, self.pairs if pairs is None else pairs, self.node_types, **kwargs)

    @property
    def result(self) -> Attribution:
        if self._result is None:
            before = snapshot(self.model.hf_model)
            self._result = self.run()
            assert_unchanged(self.model.hf_model, before)
        return self._result


def contract(method: MethodLike, model: Model | None = None, pairs: PromptPairs | None = None,
             nodes: list[str] | None = None) -> Contract:  # fmt: skip
    """The ``Contract`` of a method id, a registry entry, or a method class (registered or not)."""
    if isinstance(method, str):
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
        entry = METHODS[method]
    elif isinstance(method, Registered):
        entry = method
    elif isinstance(method, type) and issubclass(method, Method):
        entry = next((e for e in METHODS.values() if e.cls is method), Registered(method))
    else:
        raise InputError(f"expected a method id, a METHODS entry or a Method subclass; got {method!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notices about random weights
        model = model if model is not None else tiny_model()
    return Contract(entry, model, pairs if pairs is not None else tiny_pairs(), nodes)


# The checks ----------------------------------------------------------------------------------------------


def check_capabilities(c: Contract) -> None:
    cls = c.cls
    assert isinstance(cls.summary, str) and cls.summary.strip(), f"{cls.__name__}: declare a one-line summary"
    for flag in ("exact", "needs_gradients", "seeded", "pairs_interact", "cost_is_bound", "distributable"):
        assert isinstance(getattr(cls, flag), bool), f"{cls.__name__}.{flag} must be a bool"
    assert c.node_types and set(cls.node_types) <= set(known_types()), f"{cls.__name__}.node_types: {cls.node_types}"
    assert cls.aggregation in ("mean", "mean_abs"), f"{cls.__name__}.aggregation: {cls.aggregation!r}"


def check_shapes_and_record(c: Contract) -> None:
    result = c.result
    assert isinstance(result, Attribution), f"attribute returned {type(result).__name__}"
    assert result.method == c.cls.id, f"result.method {result.method!r} != id {c.cls.id!r}"
    assert (result.direction, result.metric) == ("noising", c.pairs.metric_name)
    assert result.node_types == c.node_types, f"{result.node_types} != {c.node_types}"
    spaces = {t: space for space in spaces_for(c.model, c.node_types, c.build().get_options()) for t in space.node_types}
    for t in c.node_types:
        layout = spaces[t].shape(t, c.pairs.seq_len)
        assert tuple(result.per_pair[t].shape) == (c.pairs.n_pairs, *layout), f"per_pair[{t!r}] shape"
        assert tuple(result.scores[t].shape) == layout, f"scores[{t!r}] shape"
        assert torch.isfinite(result.per_pair[t]).all(), f"per_pair[{t!r}] not finite"
    assert result.cost.forward_equivalents > 0, "no cost recorded"
    assert result.info.get("atpstar_version") == __version__, "info lacks atpstar_version"


def check_same_answer_twice(c: Contract) -> None:
    again = c.run()
    for t in c.node_types:
        assert torch.allclose(again.per_pair[t], c.result.per_pair[t], rtol=1e-12, atol=1e-14), f"{t} differs"


def check_pairs_independent(c: Contract) -> None:
    """A pair's result alone equals its result among others (only shapes when seeded or ``pairs_interact``)."""
    together = c.result
    compare = not (c.cls.seeded or c.cls.pairs_interact)
    for i in range(c.pairs.n_pairs):
        alone = c.run(c.pairs.subset([i]))
        for t in c.node_types:
            assert alone.per_pair[t].shape == together.per_pair[t][i : i + 1].shape, f"{t} pair {i} shape"
            if compare:
                scale = float(together.per_pair[t].abs().max()) + 1e-300
                err = float((alone.per_pair[t][0] - together.per_pair[t][i]).abs().max())
                assert err <= 1e-10 * scale, f"{t} pair {i}: alone differs by {err:.2e} (set pairs_interact = True?)"


def check_cost(c: Contract) -> None:
    """The reported cost equals ``expected_cost`` (or stays within it when ``cost_is_bound``)."""
    cost = c.result.cost
    expected = c.build().expected_cost(c.model, c.pairs, c.node_types, c.result.info)
    if c.cls.cost_is_bound:
        assert cost.forward <= expected.forward * (1 + 1e-12), f"forward {cost.forward} > bound {expected.forward}"
        assert cost.backward <= expected.backward * (1 + 1e-12) + 1e-12, f"backward {cost.backward} > bound"
        return
    assert math.isclose(cost.forward, expected.forward, rel_tol=1e-12), f"forward {cost.forward} != {expected.forward}"
    assert math.isclose(cost.backward, expected.backward, rel_tol=1e-12, abs_tol=1e-12), (
        f"backward {cost.backward} != {expected.backward}"
    )


def check_save_load(c: Contract) -> None:
    result = c.result
    with tempfile.TemporaryDirectory() as folder:
        result.save(Path(folder) / "result")
        loaded = Attribution.load(Path(folder) / "result")
    assert (loaded.method, loaded.direction, loaded.metric, loaded.aggregation, loaded.model_id) == (
        result.method,
        result.direction,
        result.metric,
        result.aggregation,
        result.model_id,
    )
    assert loaded.cost.to_dict() == result.cost.to_dict() and loaded.node_types == result.node_types
    for t in result.node_types:
        assert torch.equal(loaded.per_pair[t], result.per_pair[t]) and torch.equal(loaded.scores[t], result.scores[t])
    assert set(loaded.extras) == set(result.extras)
    assert [n.name for n in loaded.top(5)] == [n.name for n in result.top(5)]


def check_unchanged_after_error(c: Contract) -> None:
    """A metric that fails mid-run (on its second call or inside a graph; else on its first) leaves the model as it was."""
    for fail_first in (False, True):
        calls = []

        def failing(logits: torch.Tensor, answer: torch.Tensor, distractor: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            if fail_first or len(calls) > 1 or logits.requires_grad:
                raise RuntimeError("metric failed mid-run")
            return logits[:, 0]

        before = snapshot(c.model.hf_model)
        try:
            c.run(tiny_pairs(n_pairs=2, seq_len=5, metric=failing))
        except RuntimeError as err:
            assert "metric failed" in str(err), f"unexpected error {err!r}"
            assert_unchanged(c.model.hf_model, before)
            return
        assert not fail_first, "a failing metric did not raise"
        assert_unchanged(c.model.hf_model, before)


def check_bad_input(c: Contract) -> None:
    """Bad direction, node types, pairs and metric shapes are refused with ``InputError``; no pass runs before."""
    calls = []

    def counting(logits: torch.Tensor, answer: torch.Tensor, distractor: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return logits[:, 0]

    pairs = tiny_pairs(n_pairs=2, seq_len=5, metric=counting)
    method = c.build()
    bad_calls: list[tuple[str, Callable[[], Any]]] = [
        ("direction", lambda: method.attribute(c.model, pairs, c.node_types, direction="nosing")),
        ("neurons", lambda: method.attribute(c.model, pairs, ["neurons"])),
        ("", lambda: method.attribute(c.model, pairs, [])),
        ("", lambda: method.attribute(c.model, (pairs.clean, pairs.noise), c.node_types)),  # type: ignore[arg-type]
    ]
    for needle, call in bad_calls:
        try:
            call()
        except InputError as err:
            assert needle in str(err), f"error {err} does not mention {needle!r}"
        else:
            raise AssertionError(f"bad input accepted ({needle or 'empty nodes / raw tensors'})")
    assert calls == [], "a forward pass ran before the input was validated"
    wrong = tiny_pairs(n_pairs=2, seq_len=5, metric=lambda logits, answer, distractor: logits.sum())
    try:
        c.run(wrong)
    except InputError as err:
        assert "shape" in str(err), f"error {err} does not mention the shape"
    else:
        raise AssertionError("a metric returning one number instead of [P] was accepted")


def check_edges(c: Contract) -> None:
    """Edges (the edge space): documented shape, finite, same twice, pair-independent, cost, names; or refused.

    A method without an entry point for edges must refuse ``nodes=["edge"]`` before any pass.
    """
    method = c.build()
    if "edges" not in c.cls.engines:
        try:
            method.attribute(c.model, c.pairs, ["edge"])
        except InputError:
            return
        raise AssertionError("edges are not among its engines, yet nodes=['edge'] was accepted")
    before = snapshot(c.model.hf_model)
    result = method.attribute(c.model, c.pairs, ["edge"])
    assert_unchanged(c.model.hf_model, before)
    (space,) = spaces_for(c.model, ["edge"], method.get_options())
    layout = space.shape("edge", c.pairs.seq_len)
    assert tuple(result.per_pair["edge"].shape) == (c.pairs.n_pairs, *layout), "per_pair['edge'] shape"
    assert torch.isfinite(result.per_pair["edge"]).all(), "edge results not finite"
    again = method.attribute(c.model, c.pairs, ["edge"])
    assert torch.allclose(again.per_pair["edge"], result.per_pair["edge"], rtol=1e-12, atol=1e-14), "edges differ"
    if not (c.cls.seeded or c.cls.pairs_interact):
        alone = method.attribute(c.model, c.pairs.subset([0]), ["edge"]).per_pair["edge"][0]
        scale = float(result.per_pair["edge"].abs().max()) + 1e-300
        err = float((alone - result.per_pair["edge"][0]).abs().max())
        assert err <= 1e-10 * scale, f"edges of pair 0 alone differ by {err:.2e}"
    expected = method.expected_cost(c.model, c.pairs, ["edge"], result.info)
    bound = c.cls.cost_is_bound
    ok = (result.cost.forward <= expected.forward * (1 + 1e-12)) if bound else math.isclose(
        result.cost.forward, expected.forward, rel_tol=1e-12
    )
    assert ok, f"edge forward cost {result.cost.forward} vs expected {expected.forward}"
    names = [node.name for node in result.top(3)]
    assert all("->" in name for name in names), f"edge names {names}"


def check_workers(c: Contract) -> None:
    """The method on work units (the in-process executor, the same units Ray workers run) gives the in-process
    numbers: its own units when ``distributable``, else whole calls on blocks of pairs merged by
    ``Attribution.concat`` (nodes and, where supported, edges); a method that cannot run there refuses
    ``workers=`` before any pass."""
    from ..distributed import LocalExecutor
    from ..methods.base import _by_pair_blocks, runs_on_workers

    method = c.build()
    in_process_only = c.cls.distributable and any(space_class(t).engine != "sites" for t in c.node_types)
    if not runs_on_workers(c.cls) or in_process_only:  # its own work units are site sweeps
        calls: list[int] = []

        def counting(logits: torch.Tensor, answer: torch.Tensor, distractor: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            return logits[:, 0]

        try:
            method.attribute(c.model, tiny_pairs(n_pairs=2, seq_len=5, metric=counting), c.node_types, workers=2)
        except InputError:
            assert calls == [], "a pass ran before workers= was refused"
            return
        raise AssertionError("runs_on_workers is False, yet workers= was accepted")
    if c.cls.distributable:
        cost = Cost()
        on_units, _, _ = method._attribute_on(
            LocalExecutor(c.model, False), c.model, c.pairs, c.node_types, "noising", cost
        )
        _assert_same(on_units, c.result.per_pair, c.node_types, "own work units")
        return
    for nodes in [c.node_types] + ([["edge"]] if "edges" in c.cls.engines else []):
        whole = c.result if nodes == c.node_types else method.attribute(c.model, c.pairs, nodes)
        blocks = _by_pair_blocks(method, LocalExecutor(c.model, False), c.model, c.pairs, nodes, "noising", None)
        _assert_same(blocks.per_pair, whole.per_pair, nodes, "blocks of pairs")
        assert math.isclose(blocks.cost.forward, whole.cost.forward, rel_tol=1e-12), "forward cost of pair blocks"
        assert math.isclose(blocks.cost.backward, whole.cost.backward, rel_tol=1e-12, abs_tol=1e-12), (
            "backward cost of pair blocks"
        )
        for t in nodes:
            assert torch.allclose(blocks.scores[t], whole.scores[t], rtol=1e-10, atol=1e-14), f"{t} scores of blocks"


def _assert_same(got: Any, want: Any, node_types: list[str], how: str) -> None:
    for t in node_types:
        a, b = got[t], want[t]
        a, b = (a.to_dense() if a.is_sparse else a), (b.to_dense() if b.is_sparse else b)
        assert a.shape == b.shape, f"{t} on {how}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), f"{t} on {how} differs from the in-process result"


CHECKS: dict[str, Callable[[Contract], None]] = {
    "capabilities": check_capabilities,
    "shapes_and_record": check_shapes_and_record,
    "same_answer_twice": check_same_answer_twice,
    "pairs_independent": check_pairs_independent,
    "cost": check_cost,
    "save_load": check_save_load,
    "unchanged_after_error": check_unchanged_after_error,
    "bad_input": check_bad_input,
    "edges": check_edges,
    "workers": check_workers,
}


def check_method(
    method: str | type[Method] | Registered,
    *,
    model: Model | None = None,
    pairs: PromptPairs | None = None,
    nodes: list[str] | None = None,
) -> None:
    """Run every contract check on ``method`` (a ``Method`` subclass, a ``METHODS`` entry or an id).

    Args:
        method: the method; a registered class is run with its registry presets.
        model: the model to run on (default: ``tiny_model()``).
        pairs: the prompt pairs (default: ``tiny_pairs()``).
        nodes: the node types to check on (default: the built-in site types the method scores); a new
            node space is checked by naming its types here.

    Raises:
        AssertionError: the first failed check, named.
    """
    c = contract(method, model, pairs, nodes)
    for name, check in CHECKS.items():
        try:
            check(c)
        except AssertionError as err:
            raise AssertionError(
                f"{c.cls.__name__} ({c.cls.id or 'unregistered'}) fails check {name!r}: {err}"
            ) from err
