"""The gradient step of attribution patching, shared by every gradient-based estimator.

``gradient_step`` runs the source prompts (no graph) and the base prompts (with a graph). At "diff
sites" it keeps only source - base per layer, formed during the base forward (the base activation is
then left to the autograd graph, which often does not save it, and the source record is dropped); at
``sites`` it keeps both runs' activations. ``GradientStep.backward`` takes ∂metric/∂activation at the
gradient sites of every layer in one backward, handing each site's gradient to a consumer the moment
autograd has it (a tensor hook registered during the forward), so the estimator forms and reduces
that site's estimate and the gradient is freed right away: gradients of all sites never exist
together. ``GradientStep.dropped`` runs, for each layer l >= 1, the backward with layer l's residual
write held constant (GradDrop, spec §5), a partial backward through layers < l whose site gradients
go to the consumer the same way: the gradient reaching resid_pre_l with layer l's write dropped is the
ordinary gradient at resid_post_l.

``atp_estimate`` is the plain AtP product Î(n) = (n(x_source) - n(x_base)) · ∂L/∂n (spec §3).
``GradientStep.release`` drops a site's differences and records once the estimator is done with them.

Memory of a step: the autograd graph, the differences (in the accumulation dtype), the ``sites``
records and what the consumer keeps. Cost: 2b forwards and b backwards for b pairs; each dropped
layer l adds a partial backward counted l / L.

Shape letters: b pairs in the step, H heads, K kv-heads, T positions, E d_head, M d_mlp, D d_model.

Example:
    >>> est = {}
    >>> with gradient_step(model, pairs, torch.arange(4), direction="noising", sites=[], diff_sites=["z"],
    ...                    grad_sites=["z"], cost=Cost()) as step:  # doctest: +SKIP
    ...     step.backward(lambda layer, site, grad: est.update({layer: atp_estimate(step, "head", layer, grad)}))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .cost import Cost
from .model import Model
from .nodes import NODE_TABLE
from .ops import upcast
from .pairs import PromptPairs
from .runner import Run

# consume(layer, site, grad): ∂metric/∂activation at one (layer, grad site), shaped like the activation
# ([b, H|K, T, E], ...); zeros where the metric does not depend on it. Called during the backward.
Consumer = Callable[[int, str, torch.Tensor], None]


class GradientStep:
    """One batch of b pairs: both runs, the metric, the source - base differences, and the backward passes.

    Attributes:
        source: the source-prompt run; ``source.get(site, layer)`` for every site in ``sites`` (no graph).
        base: the base-prompt run, recording ``sites``, the grad sites that are not diff sites, and
            ``resid_pre`` for GradDrop (tensors in the autograd graph: ``.detach()`` before arithmetic
            that must not be differentiated); ``base.scaling`` per layer.
        metric: [b] metric of each base prompt.
        diffs: (layer, diff site) -> source - base activation, upcast to the accumulation dtype.
    """

    def __init__(self, n_layers: int, sites: Sequence[str], diff_sites: Sequence[str], grad_sites: Sequence[str],
                 grad_drop: bool, cost: Cost) -> None:  # fmt: skip
        self.sites, self.diff_sites = frozenset(sites), frozenset(diff_sites)
        self.grad_sites = tuple(dict.fromkeys(grad_sites))
        self.grad_drop = grad_drop
        self.source = Run(n_layers, record={*sites, *diff_sites})
        raw = {*sites, *(s for s in self.grad_sites if s not in self.diff_sites)}
        self.base = Run(n_layers, record={*raw, *(("resid_pre",) if grad_drop else ())}, patch=self._observe)
        self.metric = torch.zeros(0)
        self.diffs: dict[tuple[int, str], torch.Tensor] = {}
        self._n_layers, self._cost = n_layers, cost
        self._hooks: list[Any] = []  # removable handles of the tensor hooks on the base run's grad sites
        self._like: dict[tuple[int, str], tuple[torch.Size, torch.dtype, torch.device]] = {}  # for zero gradients
        self._lowest: list[torch.Tensor] = []  # layer 0's grad-site activations: where every backward ends
        self._hidden: torch.Tensor | None = None  # [b, T, D] the base run's input, if no site needs a gradient
        self._consume: Consumer | None = None  # where the running pass sends gradients
        self._seen: set[tuple[int, str]] = set()
        self._layers: range = range(0)  # the layers the running pass delivers gradients for
        self._resid_grads: dict[int, torch.Tensor] = {}  # ∂L/∂resid_pre of layers 2..L (L: the final stream)

    # Called by the base run during its forward -------------------------------------------------------
    def _observe(self, layer: int, site: str, x: torch.Tensor, run: Run) -> torch.Tensor:
        """Form source - base at diff sites and hook the gradient at grad sites; ``x`` itself is unchanged."""
        if layer >= self._n_layers:  # the final residual stream (``resid_pre`` of index L) holds no nodes
            return x
        if site in self.diff_sites:  # neither operand requires grad: no graph is built
            self.diffs[(layer, site)] = upcast(self.source.get(site, layer)) - upcast(x.detach())
            if site not in self.sites:
                self.source.release(site, layer)
        if site in self.grad_sites:
            self._like[(layer, site)] = (x.shape, x.dtype, x.device)
            if x.requires_grad:
                self._hooks.append(x.register_hook(lambda grad: self._on_grad(layer, site, grad)))
                if layer == 0:
                    self._lowest.append(x)
        return x

    def _on_grad(self, layer: int, site: str, grad: torch.Tensor) -> None:
        # A partial backward starts at resid_pre of the dropped layer: a node there gets nothing from it.
        if self._consume is not None and layer in self._layers:  # hooks run with grad mode off (no create_graph)
            self._seen.add((layer, site))
            self._consume(layer, site, grad)

    # Backward passes ---------------------------------------------------------------------------------
    def backward(self, consume: Consumer) -> None:
        """One backward from the metric; ``consume`` gets every (layer, grad site) gradient as it is formed.

        Gradients reach the consumer from the last layer down; the consumer must not keep them unless it
        needs them (they are freed as soon as it returns). Counted as one backward per pair.
        """
        handles = []
        if self.grad_drop:  # the residual-stream gradients seed the partial backwards of ``dropped``
            for layer in range(2, self._n_layers + 1):
                store = self._resid_grads.__setitem__
                handles.append(self.base.get("resid_pre", layer).register_hook(lambda g, i=layer: store(i, g)))
        try:
            self._pass(self.metric.sum(), None, range(self._n_layers), consume, retain=self.grad_drop)
        finally:
            for handle in handles:
                handle.remove()
        self._cost.add_backward(int(self.metric.shape[0]))

    def dropped(self, consume: Consumer) -> Iterator[int]:
        """For l = 1..L-1 in turn: the backward with layer l's write dropped, then yield l.

        Each iteration hands the gradients at the grad sites of layers < l to ``consume`` before it yields.
        Needs ``grad_drop=True`` and ``backward`` first. Consume it once, in order: the graph is freed after
        the last layer. Each partial backward is counted as l / L of a backward per pair.
        """
        if not self.grad_drop or not self._resid_grads:
            raise RuntimeError("GradientStep.dropped() needs gradient_step(..., grad_drop=True) and backward() first")
        n_layers, n_pairs = self._n_layers, int(self.metric.shape[0])
        for drop in range(1, n_layers):
            # ∂L/∂resid_post_drop (= resid_pre_{drop+1}), fed in at resid_pre_drop: layer drop's write is skipped.
            seed = self._resid_grads.pop(drop + 1)
            self._pass(self.base.get("resid_pre", drop), seed, range(drop), consume, retain=drop < n_layers - 1)
            del seed
            self._cost.add_backward(n_pairs, layers_covered=drop, n_layers=n_layers)
            yield drop

    def _pass(self, output: torch.Tensor, seed: torch.Tensor | None, layers: range, consume: Consumer,
              retain: bool) -> None:  # fmt: skip
        """Backward from ``output`` (gradient ``seed``) to layer 0's grad sites; sites never reached get zeros."""
        self._consume, self._seen, self._layers = consume, set(), layers
        try:
            # autograd computes nothing below layer 0's sites (the input only when no site needs a gradient)
            inputs = self._lowest or ([] if self._hidden is None else [self._hidden])
            with torch.enable_grad():
                grads = torch.autograd.grad(output, inputs, grad_outputs=seed, retain_graph=retain, allow_unused=True)
            del grads  # layer 0's gradients already went to the consumer through their hooks
        finally:
            self._consume = None
        for layer in layers:
            for site in self.grad_sites:
                if (layer, site) not in self._seen:
                    shape, dtype, device = self._like[(layer, site)]
                    with torch.no_grad():
                        consume(layer, site, torch.zeros(shape, dtype=dtype, device=device))

    def release(self, site: str, layer: int) -> None:
        """Drop the difference and both runs' records of ``site`` at ``layer`` (the graph may still hold some)."""
        self.diffs.pop((layer, site), None)
        for run in (self.source, self.base):
            # GradDrop's partial backwards start at the base run's resid_pre: keep it while they may run
            keep = run is self.base and self.grad_drop and site == "resid_pre"
            if site in run.record and not keep:
                run.release(site, layer)

    def close(self) -> None:
        """Remove the gradient hooks (they reference this step: the graph would keep it alive)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._lowest.clear()
        self.diffs.clear()


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
        cost: the pass counter the step adds to (2b forwards here, b backwards in ``backward``).
        grad_drop: keep the graph and the residual-stream gradients for ``GradientStep.dropped``.

    Yields:
        ``GradientStep`` with both runs, the differences and the metric.
    """
    base_tokens, source_tokens = (tokens[index] for tokens in pairs.base_and_source(direction))
    step = GradientStep(model.n_layers, sites, diff_sites, grad_sites, grad_drop, cost)
    try:
        with torch.inference_mode():
            model.run_layers(model.embed(source_tokens), step.source)
        with torch.enable_grad():
            hidden = model.embed(base_tokens).detach().requires_grad_(True)
            step._hidden = hidden
            final = model.run_layers(hidden, step.base)
            step.metric = pairs.evaluate_metric(model.unembed(final[:, -1]), index.to(final.device))  # [b]
        cost.add_forward(2 * len(index))
        yield step
    finally:
        step.close()


def atp_estimate(step: GradientStep, node_type: str, layer: int, grad: torch.Tensor) -> torch.Tensor:
    """Î_AtP of every node of ``node_type`` at ``layer``: (source - base) · grad, [b, *layout[1:]].

    ``grad`` is ∂L/∂activation at the node type's site of ``layer`` (as a consumer receives it); the site
    must be one of the step's diff sites and grad sites.
    """
    row = NODE_TABLE[node_type]
    # Half-precision gradients are upcast like the differences (ops.accumulation_dtype). No graph: the
    # difference is detached and a gradient handed to a consumer does not require grad.
    prod = step.diffs[(layer, row.site)] * upcast(grad.detach())  # [b, T, M] or [b, H|K, T, E]
    return prod.sum(-1) if row.vector else prod  # [b, T, M] or [b, H|K, T]
