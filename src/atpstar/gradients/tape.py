"""The backward passes of one differentiable forward, with gradients handed out as autograd forms them.

A ``Tape`` watches tensors of a forward (grad sites, keyed by (layer, site)) and the residual stream
entering each layer. ``backward`` runs one backward from the metric: each watched tensor's gradient
∂L/∂x goes to a consumer the moment autograd has it (a tensor hook), so an estimator forms and reduces
that site's estimate at once and the gradient is freed right away; sites the metric does not reach get
zeros. ``dropped`` runs GradDrop's partial backwards (Kramár et al. 2024 §5): for each layer l >= 1, the
backward with layer l's residual write held constant, i.e. the ordinary gradient at resid_post_l =
resid_pre_{l+1} fed in at resid_pre_l and run down through layers < l, whose site gradients go to the
consumer the same way. Node and edge estimators both take their gradients from here.

``streamed`` runs the same passes one layer at a time from the top: layer j is run through by the full
backward, then by the partial backward of every l > j in ascending order, the last of them freeing layer j's
graph. Every gradient is the one ``backward`` and ``dropped`` give, and each node's terms arrive in the same
order, but a layer's graph, differences and records go as soon as its turn is over; ``backward`` +
``dropped`` must keep the whole graph and every layer's data until the last partial backward.

Cost: one backward per pair for ``backward``; ``dropped`` adds, for each l = 1..L-1, a partial backward
counted l / L per pair (about L/2 backwards in all); ``streamed`` counts both.

Shape letters: b pairs in the step, T positions, D d_model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..cost import Cost

# consume(layer, site, grad): ∂metric/∂activation at one watched (layer, site), shaped like the activation;
# zeros where the metric does not depend on it. Called during the backward; the gradient dies on return.
Consumer = Callable[[int, str, torch.Tensor], None]


class Tape:
    """Gradient hooks on one forward, and the backward passes that feed them to consumers.

    Args:
        n_layers: L.
        cost: the pass counter the backward passes add to.
        grad_drop: keep the graph and the residual-stream gradients for ``dropped``.
    """

    def __init__(self, n_layers: int, cost: Cost, grad_drop: bool = False) -> None:
        self.n_layers, self.cost, self.grad_drop = n_layers, cost, grad_drop
        self.hidden: torch.Tensor | None = None  # [b, T, D] the forward's input: where a backward ends if no site is
        self.resid: Sequence[torch.Tensor | None] = ()  # resid_pre per layer, [L] the final stream (for GradDrop)
        self._hooks: list[Any] = []  # removable handles: they reference this tape, the graph would keep it alive
        self._like: dict[tuple[int, str], tuple[torch.Size, torch.dtype, torch.device]] = {}  # for zero gradients
        self._lowest: list[torch.Tensor] = []  # layer 0's watched tensors: where every backward ends
        self._consume: Consumer | None = None  # where the running pass sends gradients
        self._seen: set[tuple[int, str]] = set()
        self._layers = (0, 0)  # the running pass hands out gradients of layers lo <= layer < hi
        self._resid_grads: dict[int, torch.Tensor] = {}  # ∂L/∂resid_pre of layers 2..L

    def watch(self, layer: int, site: str, x: torch.Tensor) -> None:
        """Send ∂L/∂x to the consumer of every later pass as (layer, site); during or after the forward."""
        self._like[(layer, site)] = (x.shape, x.dtype, x.device)
        if x.requires_grad:
            self._hooks.append(x.register_hook(lambda grad: self._on_grad(layer, site, grad)))
            if layer == 0:
                self._lowest.append(x)

    def _on_grad(self, layer: int, site: str, grad: torch.Tensor) -> None:
        # A partial backward starts at resid_pre of the dropped layer: a node there gets nothing from it.
        low, high = self._layers
        if self._consume is not None and low <= layer < high:  # hooks run with grad mode off (no create_graph)
            self._seen.add((layer, site))
            self._consume(layer, site, grad)

    def backward(self, metric: torch.Tensor, consume: Consumer) -> None:
        """One backward from ``metric`` [b]; ``consume`` gets every watched gradient, top layer first.

        Counted as one backward per pair.
        """
        handles = []
        if self.grad_drop:  # the residual-stream gradients seed the partial backwards of ``dropped``
            for layer in range(2, self.n_layers + 1):
                store = self._resid_grads.__setitem__
                handles.append(self._resid_at(layer).register_hook(lambda g, i=layer: store(i, g)))
        try:
            self._pass(metric.sum(), None, self.n_layers + 1, consume, retain=self.grad_drop)
        finally:
            for handle in handles:
                handle.remove()
        self.cost.add_backward(int(metric.shape[0]))

    def dropped(self, consume: Consumer) -> Iterator[int]:
        """For l = 1..L-1 in turn: the backward with layer l's write dropped, then yield l.

        Each iteration hands the gradients at the watched sites of layers < l to ``consume`` before it
        yields. Needs ``grad_drop=True`` and ``backward`` first. Consume it once, in order: the graph is
        freed after the last layer. Each partial backward is counted as l / L of a backward per pair.
        """
        if not self.grad_drop or not self._resid_grads:
            raise RuntimeError("Tape.dropped() needs grad_drop=True and backward() first")
        n_layers = self.n_layers
        n_pairs = int(self._resid_grads[n_layers].shape[0])
        for drop in range(1, n_layers):
            # ∂L/∂resid_post_drop (= resid_pre_{drop+1}), fed in at resid_pre_drop: layer drop's write is skipped.
            seed = self._resid_grads.pop(drop + 1)
            self._pass(self._resid_at(drop), seed, drop, consume, retain=drop < n_layers - 1)
            del seed
            self.cost.add_backward(n_pairs, layers_covered=drop, n_layers=n_layers)
            yield drop

    def _resid_at(self, layer: int) -> torch.Tensor:
        resid = self.resid[layer]
        if resid is None:
            raise RuntimeError(f"Tape.resid[{layer}] was not recorded; GradDrop needs the residual stream")
        return resid

    def streamed(self, metric: torch.Tensor, full: Consumer, dropped: Consumer, done: Callable[[int], None]) -> None:
        """``backward`` and ``dropped`` layer by layer from the top, each layer's graph freed after its last pass.

        For j = L-1 .. 0: the full backward through layer j hands its sites' gradients to ``full``, then the
        partial backward of every l > j (layer l's write dropped), in ascending l, hands them to ``dropped``; the
        last pass through layer j frees its graph, and ``done(j)`` follows (nothing of layer j is used after it).
        The gradients are those of ``backward`` and ``dropped`` and each site receives them in the same order
        (the full one, then l = j+1 .. L-1), so estimates summed as they arrive are unchanged. Needs
        ``grad_drop=True``; counted as ``backward`` plus every partial backward.
        """
        if not self.grad_drop:
            raise RuntimeError("Tape.streamed() needs grad_drop=True")
        n_layers, n_pairs = self.n_layers, int(metric.shape[0])
        # ∂L/∂resid_pre of layer L (the final stream), through the final norm and unembedding, which are freed
        above = self._segment(metric.sum(), None, n_layers, full, retain=False)
        started: torch.Tensor | None = None  # ∂L/∂resid_pre_{j+2}: the seed of the partial backward l = j+1
        passes: list[torch.Tensor] = []  # per l = j+1 .. L-1 ascending, that pass's gradient at resid_pre_{j+1}
        for layer in range(n_layers - 1, -1, -1):
            if started is not None:
                passes.insert(0, started)  # pass l = layer + 1 feeds ∂L/∂resid_post_l in at resid_pre_l
            below = self._segment(self._resid_at(layer + 1), above, layer, full, retain=bool(passes))
            for i, seed in enumerate(passes):
                passes[i] = self._segment(self._resid_at(layer + 1), seed, layer, dropped, retain=i < len(passes) - 1)
            done(layer)
            started, above = above, below
        self.cost.add_backward(n_pairs)
        for drop in range(1, n_layers):
            self.cost.add_backward(n_pairs, layers_covered=drop, n_layers=n_layers)

    def _segment(self, output: torch.Tensor, seed: torch.Tensor | None, layer: int, consume: Consumer,
                 retain: bool) -> torch.Tensor:  # fmt: skip
        """Backward from ``output`` (gradient ``seed``) through ``layer`` alone, down to its resid_pre (layer L:
        from the metric to the final stream); returns ∂/∂resid_pre of ``layer`` (layer 0: nothing, [0])."""
        if layer == 0:
            self._pass(output, seed, 1, consume, retain)
            return torch.zeros(0)
        resid = self._resid_at(layer)
        grads = self._pass(output, seed, layer + 1, consume, retain, inputs=[resid], low=layer)
        return torch.zeros_like(resid) if grads[0] is None else grads[0]

    def _pass(self, output: torch.Tensor, seed: torch.Tensor | None, below: int, consume: Consumer,
              retain: bool, inputs: list[torch.Tensor] | None = None, low: int = 0) -> tuple[Any, ...]:  # fmt: skip
        """Backward from ``output`` (gradient ``seed``) to ``inputs`` (default: layer 0); watched sites of layers
        ``low`` <= layer < ``below`` go to ``consume``, those that autograd never reached get zeros."""
        self._consume, self._seen, self._layers = consume, set(), (low, below)
        try:
            # autograd computes nothing below layer 0's sites (the input only when no site needs a gradient)
            inputs = inputs or self._lowest or ([] if self.hidden is None else [self.hidden])
            with torch.enable_grad():
                grads = torch.autograd.grad(output, inputs, grad_outputs=seed, retain_graph=retain, allow_unused=True)
        finally:
            self._consume = None
        for (layer, site), (shape, dtype, device) in self._like.items():
            if low <= layer < below and (layer, site) not in self._seen:
                with torch.no_grad():
                    consume(layer, site, torch.zeros(shape, dtype=dtype, device=device))
        return grads  # layer 0's gradients already went to the consumer through their hooks

    def close(self) -> None:
        """Remove the gradient hooks and forget the watched tensors."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._lowest.clear()
        self._resid_grads.clear()
        self.resid, self.hidden = (), None
