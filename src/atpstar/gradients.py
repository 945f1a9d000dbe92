"""The gradient step of attribution patching, shared by every gradient-based estimator.

``gradient_step`` runs the source prompts (no graph) and the base prompts (with a graph), records
activations at runner sites, and takes ∂metric/∂activation at the requested gradient sites of every
layer in one backward. ``GradientStep.dropped`` then gives, for each layer l >= 1, the gradients the
backward would give with layer l's residual write held constant (GradDrop, spec §5), each from one
partial backward through layers < l: the gradient reaching resid_pre_l with layer l's write dropped
is the ordinary gradient at resid_post_l.

An estimator combines these with the recorded activations; ``atp_estimate`` is the plain AtP product
Î(n) = (n(x_source) - n(x_base)) · ∂L/∂n (spec §3).

Cost: 2b forwards and b backwards for b pairs; each dropped layer l adds a partial backward counted l / L.

Shape letters: b pairs in the step, H heads, K kv-heads, T positions, E d_head, M d_mlp, D d_model.

Example:
    >>> step = gradient_step(model, pairs, torch.arange(4), direction="noising",
    ...                      sites=["z"], grad_sites=["z"], cost=Cost())  # doctest: +SKIP
    >>> est = atp_estimate(step, "head", layer=0, grads=step.grads)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .cost import Cost
from .model import Model
from .nodes import NODE_TABLE
from .ops import upcast
from .pairs import PromptPairs
from .runner import Run

# (layer, runner site) -> ∂metric/∂activation, shaped like the recorded activation ([b, H|K, T, E], ...).
SiteGrads = dict[tuple[int, str], torch.Tensor]


@dataclass
class GradientStep:
    """What one gradient step computed for a batch of b pairs.

    Attributes:
        source: the source-prompt run; ``source.get(site, layer)`` for every site in ``sites`` (no graph).
        base: the base-prompt run, recording ``sites`` and ``grad_sites`` (tensors in the autograd graph:
            ``.detach()`` before arithmetic that must not be differentiated); ``base.scaling`` per layer.
        metric: [b] metric of each base prompt.
        grads: ∂metric/∂activation at every (layer, grad site); zeros where the metric does not depend on it.
    """

    source: Run
    base: Run
    metric: torch.Tensor
    grads: SiteGrads
    _targets: list[tuple[int, str]]
    _resid_grads: tuple[torch.Tensor | None, ...]  # ∂L/∂resid_pre of layers 1..L (L: the final stream)
    _cost: Cost

    def dropped(self) -> Iterator[tuple[int, SiteGrads]]:
        """For l = 1..L-1 in turn: (l, gradients at the grad sites of layers < l with layer l's write dropped).

        Needs ``gradient_step(..., grad_drop=True)``. Consume it once, in order: the graph is freed
        after the last layer. Each partial backward is counted as l / L of a backward per pair.
        """
        if not self._resid_grads:
            raise RuntimeError("GradientStep.dropped() needs gradient_step(..., grad_drop=True)")
        n_layers = len(self._resid_grads)
        n_pairs = int(self.metric.shape[0])
        for drop in range(1, n_layers):
            below = [key for key in self._targets if key[0] < drop]
            tensors = [self.base.get(site, layer) for layer, site in below]
            with torch.enable_grad():
                grads = torch.autograd.grad(
                    self.base.get("resid_pre", drop),
                    tensors,
                    grad_outputs=self._resid_grads[drop],  # ∂L/∂resid_post_drop (= resid_pre_{drop+1})
                    retain_graph=drop < n_layers - 1,
                    allow_unused=True,
                )
            self._cost.add_backward(n_pairs, layers_covered=drop, n_layers=n_layers)
            yield drop, {key: _or_zero(g, t) for key, g, t in zip(below, grads, tensors)}


def gradient_step(
    model: Model,
    pairs: PromptPairs,
    index: torch.Tensor,
    *,
    direction: str,
    sites: Sequence[str],
    grad_sites: Sequence[str],
    cost: Cost,
    grad_drop: bool = False,
) -> GradientStep:
    """Run source and base prompts of pairs ``index`` and differentiate the metric at ``grad_sites``.

    Args:
        model: the wrapped model.
        pairs: the prompt pairs and metric.
        index: [b] the pairs of this step.
        direction: ``"noising"`` (base = clean, source = noise) or ``"denoising"`` (the reverse).
        sites: runner sites (``runner.SITES``) recorded in both runs, e.g. ``NODE_TABLE[t].site``.
        grad_sites: runner sites whose gradient is taken at every layer (recorded in the base run).
        cost: the pass counter the step adds to (2b forwards, b backwards).
        grad_drop: keep the graph and the residual-stream gradients for ``GradientStep.dropped``.

    Returns:
        ``GradientStep`` with both runs, the metric and the gradients.
    """
    base_tokens, source_tokens = (tokens[index] for tokens in pairs.base_and_source(direction))
    n_layers, n_pairs = model.n_layers, len(index)
    with torch.inference_mode():
        source = Run(n_layers, record=sites)
        model.run_layers(model.embed(source_tokens), source)
    with torch.enable_grad():
        base = Run(n_layers, record={*sites, *grad_sites, *(("resid_pre",) if grad_drop else ())})
        hidden = model.embed(base_tokens).detach().requires_grad_(True)
        final = model.run_layers(hidden, base)
        metric = pairs.evaluate_metric(model.unembed(final[:, -1]), index.to(final.device))  # [b]
        cost.add_forward(2 * n_pairs)
        targets = [(layer, site) for layer in range(n_layers) for site in dict.fromkeys(grad_sites)]
        tensors = [base.get(site, layer) for layer, site in targets]
        resid = [base.get("resid_pre", layer) for layer in range(1, n_layers + 1)] if grad_drop else []
        grads = torch.autograd.grad(metric.sum(), tensors + resid, retain_graph=grad_drop, allow_unused=True)
        cost.add_backward(n_pairs)
    by_site = {key: _or_zero(g, t) for key, g, t in zip(targets, grads, tensors)}
    return GradientStep(source, base, metric, by_site, targets, tuple(grads[len(tensors) :]), cost)


def atp_estimate(step: GradientStep, node_type: str, layer: int, grads: SiteGrads) -> torch.Tensor:
    """Î_AtP of every node of ``node_type`` at ``layer``: (source - base) · grad, [b, *layout[1:]].

    ``grads`` is ``step.grads`` or one of ``step.dropped()``'s; the site of ``node_type`` must be among
    the step's sites and grad sites.
    """
    row = NODE_TABLE[node_type]
    with torch.no_grad():
        # Half-precision activations and gradients are upcast first (ops.accumulation_dtype).
        diff = upcast(step.source.get(row.site, layer)) - upcast(step.base.get(row.site, layer).detach())
        prod = diff * upcast(grads[(layer, row.site)])  # [b, T, M] or [b, H|K, T, E]
        return prod.sum(-1) if row.vector else prod  # [b, T, M] or [b, H|K, T]


def _or_zero(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A site the metric does not depend on gets a zero gradient (autograd returns None)."""
    return torch.zeros_like(like) if grad is None else grad
