"""The gradient step of attribution patching, shared by every gradient-based node estimator.

``gradient_step`` runs the source prompts (no graph) and the base prompts. At "diff sites" it keeps only
source - base per layer, formed during the base forward (the base activation is then left to the
autograd graph, which often does not save it, and the source record is dropped); at ``sites`` it keeps
both runs' activations. Where the gradient is taken is the step's ``points`` (``gradients.points``): at
the base run (AtP) the base forward keeps its graph and is the one gradient run; on a path (integrated
gradients) each of the m interpolated inputs gets its own forward with a graph. ``GradientStep.backward``
hands ∂metric/∂activation at the grad sites of every layer to a consumer the moment autograd has it
(``gradients.tape``), point by point; ``GradientStep.dropped`` runs GradDrop's partial backwards, and
``GradientStep.streamed`` both, layer by layer from the top, so each layer's graph and data go after its turn.
A difference can be written into a tensor the caller gives (``diff_into``, e.g. the result's rows of an
elementwise node type, which its estimate later overwrites), so it takes no memory of its own.

``atp_estimate`` is the AtP product Î(n) = (n(x_source) - n(x_base)) · ∂L/∂n (Kramár et al. 2024), on a path with
the gradient summed over the points (``summed_over_points``) and divided by m.
``GradientStep.release`` drops a site's differences and records once the estimator is done with them.

Memory of a step: one gradient run's autograd graph, the differences (in the accumulation dtype), the
``sites`` records, what the consumer keeps (on a path: the running sum of every grad site's gradient).
Cost: 2b forwards and b backwards for b pairs at the base run; on a path 2b + mb forwards and mb
backwards; each dropped layer l adds a partial backward counted l / L.

Shape letters: b pairs in the step, H heads, K kv-heads, T positions, E d_head, M d_mlp, D d_model.

Example:
    >>> est = {}
    >>> with gradient_step(model, pairs, torch.arange(4), direction="noising", sites=[], diff_sites=["z"],
    ...                    grad_sites=["z"], cost=Cost()) as step:  # doctest: +SKIP
    ...     step.backward(lambda layer, site, grad: est.update({layer: atp_estimate(step, "head", layer, grad)}))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from ..cost import Cost
from ..errors import InputError
from ..model import Model
from ..nodes import NODE_TABLE
from ..ops import upcast
from ..pairs import PromptPairs
from ..runner import Run
from .points import AT_BASE, Points
from .tape import Consumer, Tape

_CONTIGUOUS = ("q",)  # recorded sites the forward copies to a contiguous layout anyway (ops.raw_scores)

# forward(embeddings [b, T, D], run) -> metric [b]: one differentiable run of the step's base prompts.
Forward = Callable[[torch.Tensor, Run], torch.Tensor]


class GradientStep:
    """One batch of b pairs: both runs, the source - base differences, and the backward passes.

    Attributes:
        source: the source-prompt run; ``source.get(site, layer)`` for every site in ``sites`` (no graph).
        base: the base-prompt run, recording ``sites`` and the grad sites that are not diff sites (at the
            base run: tensors in the autograd graph, ``.detach()`` before arithmetic that must not be
            differentiated); ``base.scaling`` per layer.
        metric: [b] metric of the running gradient run (the base prompts at the base run).
        diffs: (layer, diff site) -> source - base activation, upcast to the accumulation dtype.
        points: where the gradients are taken; ``point`` is the index of the one being differentiated.
    """

    def __init__(self, n_layers: int, sites: Sequence[str], diff_sites: Sequence[str], grad_sites: Sequence[str],
                 grad_drop: bool, cost: Cost, points: Points = AT_BASE,
                 diff_into: Mapping[str, torch.Tensor] | None = None) -> None:  # fmt: skip
        if grad_drop and not points.at_base:
            raise InputError(
                "GradDrop drops layers from the base run's backward: use points=AT_BASE with grad_drop=True, "
                "or grad_drop=False on a path"
            )
        self.sites, self.diff_sites = frozenset(sites), frozenset(diff_sites)
        self.grad_sites = tuple(dict.fromkeys(grad_sites))
        self.grad_drop, self.points, self.point = grad_drop, points, 0
        self.source = Run(n_layers, record={*sites, *diff_sites})
        raw = {*sites, *(s for s in self.grad_sites if s not in self.diff_sites)}
        self.base = Run(n_layers, record={*raw, *(("resid_pre",) if grad_drop else ())}, patch=self._observe)
        self.metric = torch.zeros(0)
        self.diffs: dict[tuple[int, str], torch.Tensor] = {}
        self._diff_into = dict(diff_into or {})  # diff site -> [b, L, ...]: layer l's difference goes to [:, l]
        self.tape = Tape(n_layers, cost, grad_drop)  # the base run's at the base run, else the running point's
        self._n_layers, self._cost = n_layers, cost
        self._embeds: tuple[torch.Tensor, torch.Tensor] = (torch.zeros(0), torch.zeros(0))  # on a path: [b, T, D] x2
        self._forward: Forward | None = None  # on a path: the metric [b] of a forward from embeddings

    @property
    def last_point(self) -> bool:
        """The gradients being handed out are the last point's."""
        return self.point == self.points.n - 1

    def _observe(self, layer: int, site: str, x: torch.Tensor, run: Run) -> torch.Tensor:
        """Form source - base at diff sites and watch the gradient at grad sites; ``x`` itself is unchanged."""
        if layer >= self._n_layers:  # the final residual stream (``resid_pre`` of index L) holds no nodes
            return x
        if site in self.diff_sites:  # neither operand requires grad: no graph is built
            self.diffs[(layer, site)] = self._difference(site, layer, x)
            if site not in self.sites:
                self.source.release(site, layer)
        if site in self.grad_sites and self.points.at_base:
            self.tape.watch(layer, site, x)
        if site in _CONTIGUOUS and site in self.sites and self.points.at_base:
            # q·kᵀ saves a contiguous q (its own copy when q is a transposed view): handing on and recording that
            # copy makes the record and the tensor autograd saves one, where they were two (the same values and
            # layout reach the matmul, so nothing changes)
            return x.contiguous()
        return x

    def _difference(self, site: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        """source - base at ``site`` of ``layer``, written into ``diff_into`` where a layer of it has x's shape."""
        source, base = upcast(self.source.get(site, layer)), upcast(x.detach())
        into = self._diff_into.get(site)
        row = None if into is None else into[:, layer]  # [b, *site]
        if row is None or row.shape != base.shape or row.dtype != base.dtype or row.device != base.device:
            return source - base
        return torch.sub(source, base, out=row)

    def backward(self, consume: Consumer) -> None:
        """For each point: one backward from the metric; ``consume`` gets every (layer, grad site) gradient.

        Gradients reach the consumer from the last layer down, point after point (``point``); the consumer
        must not keep them unless it needs them (they are freed as soon as it returns). Counted as one
        forward (on a path) and one backward per pair and point.
        """
        if self.points.at_base:
            self.tape.backward(self.metric, consume)
            return
        if self._forward is None:
            raise RuntimeError("GradientStep.backward() on a path needs gradient_step() to run the base forward")
        for self.point, hidden in enumerate(self.points.inputs(*self._embeds)):
            self.tape.close()
            self.tape = Tape(self._n_layers, self._cost)
            with torch.enable_grad():
                hidden = hidden.requires_grad_(True)
                self.tape.hidden = hidden
                self.metric = self._forward(hidden, Run(self._n_layers, patch=self._watch))  # [b]
            self._cost.add_forward(int(self.metric.shape[0]))
            self.tape.backward(self.metric, consume)

    def _watch(self, layer: int, site: str, x: torch.Tensor, run: Run) -> torch.Tensor:
        if site in self.grad_sites and layer < self._n_layers:
            self.tape.watch(layer, site, x)
        return x

    def dropped(self, consume: Consumer) -> Iterator[int]:
        """GradDrop's partial backwards (``Tape.dropped``): yields l = 1..L-1 after handing out layer < l's gradients."""
        return self.tape.dropped(consume)

    def streamed(self, full: Consumer, dropped: Consumer, done: Callable[[int], None]) -> None:
        """``backward`` and ``dropped`` one layer at a time from the top (``Tape.streamed``): ``full`` and then
        ``dropped`` get a layer's gradients in the order those give them; after ``done(j)`` the base run's
        residual stream entering layer j + 1 is dropped (``done`` releases what else it read). Needs grad_drop."""

        def finish(layer: int) -> None:
            done(layer)
            self.base.release("resid_pre", layer + 1)

        self.tape.streamed(self.metric, full, dropped, finish)

    def release(self, site: str, layer: int) -> None:
        """Drop the difference and both runs' records of ``site`` at ``layer`` (the graph may still hold some)."""
        self.diffs.pop((layer, site), None)
        for run in (self.source, self.base):
            # GradDrop's partial backwards start at the base run's resid_pre: keep it while they may run
            keep = run is self.base and self.tape.grad_drop and site == "resid_pre"
            if site in run.record and not keep:
                run.release(site, layer)

    def close(self) -> None:
        """Remove the gradient hooks and drop both runs (hooks and the base run's patch reference this step:
        the cycle would keep the batch's graph and activations alive until the cycle collector ran)."""
        self.tape.close()
        self.diffs.clear()
        self.source.close()
        self.base.close()
        self.metric = torch.zeros(0)
        self._embeds, self._forward = (torch.zeros(0), torch.zeros(0)), None


@contextmanager
def gradient_step(
    model: Model,
    pairs: PromptPairs,
    index: torch.Tensor,
    *,
    direction: str,
    sites: Sequence[str],
    diff_sites: Sequence[str],
    grad_sites: Sequence[str],
    cost: Cost,
    grad_drop: bool = False,
    points: Points = AT_BASE,
    diff_into: Mapping[str, torch.Tensor] | None = None,
) -> Iterator[GradientStep]:
    """Run source and base prompts of pairs ``index``; the backward passes follow (``GradientStep.backward``).

    A context manager: the gradient hooks are removed on leaving it, also after an error.

    Args:
        model: the wrapped model.
        pairs: the prompt pairs and metric.
        index: [b] the pairs of this step.
        direction: ``"noising"`` (base = clean, source = noise) or ``"denoising"`` (the reverse).
        sites: runner sites (``runner.SITES``) whose activations both runs keep, e.g. for the QK fix.
        diff_sites: runner sites where only source - base is kept (``GradientStep.diffs``).
        grad_sites: runner sites whose gradient goes to the consumer at every layer.
        cost: the pass counter the step adds to (2b forwards here, the rest in ``backward``).
        grad_drop: keep the graph and the residual-stream gradients for ``GradientStep.dropped``.
        points: where the gradients are taken: ``AT_BASE`` (AtP) or ``path(m)`` (integrated gradients).
        diff_into: optional diff site -> [b, L, ...] tensor in the accumulation dtype: layer l's difference is
            written into its [:, l] where that has the activation's shape (else it gets its own tensor). The
            caller must not write there while the difference is in use.

    Yields:
        ``GradientStep`` with both runs, the differences and (at the base run) the metric.
    """
    base_tokens, source_tokens = (tokens[index] for tokens in pairs.base_and_source(direction))
    step = GradientStep(model.n_layers, sites, diff_sites, grad_sites, grad_drop, cost, points, diff_into)

    def forward(hidden: torch.Tensor, run: Run) -> torch.Tensor:
        final = model.run_layers(hidden, run)
        return pairs.answer_metric(model, final, index)  # [b]

    try:
        if points.at_base:
            with torch.inference_mode():
                model.run_layers(model.embed(source_tokens), step.source)
            with torch.enable_grad():
                hidden = model.embed(base_tokens).detach().requires_grad_(True)
                step.tape.hidden = hidden
                step.metric = forward(hidden, step.base)
                step.tape.resid = step.base.records.get("resid_pre", ())
        else:
            with torch.no_grad():  # the embeddings start every point's graph: not inference tensors
                base_embed, source_embed = model.embed(base_tokens), model.embed(source_tokens)
                model.run_layers(source_embed, step.source)
                model.run_layers(base_embed, step.base)
            step._embeds, step._forward = (base_embed, source_embed), forward
        cost.add_forward(2 * len(index))
        yield step
    finally:
        step.close()


def summed_over_points(step: GradientStep, consume: Consumer) -> Consumer:
    """A consumer that sums each site's gradient over the step's points and hands ``consume`` the sum at the
    last point (the gradient itself at the base run). Holds one running sum per (layer, grad site) meanwhile."""
    if step.points.n == 1:
        return consume
    total: dict[tuple[int, str], torch.Tensor] = {}

    def add(layer: int, site: str, grad: torch.Tensor) -> None:
        key, grad = (layer, site), upcast(grad.detach())
        summed = total.pop(key) + grad if key in total else grad.clone()  # autograd may reuse its buffer
        if step.last_point:
            consume(layer, site, summed)
        else:
            total[key] = summed

    return add


def atp_estimate(step: GradientStep, node_type: str, layer: int, grad: torch.Tensor) -> torch.Tensor:
    """Î_AtP of every node of ``node_type`` at ``layer``: (source - base) · grad, [b, *layout[1:]].

    ``grad`` is ∂L/∂activation at the node type's site of ``layer`` (as a consumer receives it; on a path the
    sum over the points, which the product divides by m); the site must be a diff site and a grad site.
    """
    row = NODE_TABLE[node_type]
    # Half-precision gradients are upcast like the differences (ops.accumulation_dtype). No graph: the
    # difference is detached and a gradient handed to a consumer does not require grad.
    return row.pullback(step.diffs[(layer, row.site)], upcast(grad.detach()), step.points.mean)  # [b, *layout[1:]]
