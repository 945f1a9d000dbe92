"""Attribution patching and AtP*.

Î_AtP(n) = (n(x_source) - n(x_base)) · ∂L/∂n at the base run (spec §3); the QK fix recomputes the
softmax exactly for patched queries/keys (§4); GradDrop averages |Î_l| over runs with layer l's
residual write dropped from the backward graph, ĉ = Σ_l |Î_l| / (L - 1) (§5).
Cost per pair: 2 forwards + 1 backward; GradDrop adds partial backwards from every layer l, each
counted l / L (about L/2 backwards in all), the exact cheap scheme of §5.
"""

from __future__ import annotations

from typing import Any

import torch

from ..cost import Cost
from ..engine import SITE_OF
from ..errors import InputError
from ..model import Model
from ..nodes import ALL_TYPES, node_shape
from ..ops import graddrop_combine, key_fix, query_fix
from ..pairs import PromptPairs
from ..progress import progress_bar
from ..runner import Run
from .base import Method, register


@register("atp*", qk_fix=True, grad_drop=True)
@register("atp+graddrop", qk_fix=False, grad_drop=True)
@register("atp+qkfix", qk_fix=True, grad_drop=False)
@register("atp", qk_fix=False, grad_drop=False)  # decorators apply bottom-up: this order lists atp first
class AttributionPatching(Method):
    """AtP and its fixes; the method ids fix ``qk_fix`` and ``grad_drop``.

    ``per_pair`` holds signed Î_AtP for ``atp`` and ``atp+qkfix``, and the GradDrop score
    Σ_l |Î_l| / (L - 1) (non-negative) for ``atp+graddrop`` and ``atp*``. ``scores`` is the mean of
    absolute per-pair values.

    GradDrop needs depth: a node at layer m scores m·|Î_AtP| plus its terms for dropped layers above
    it, so a layer-0 node whose only route to the metric runs through layer 1 scores 0 in a 2-layer
    model (true of the formula, not an approximation). Prefer ``atp+qkfix`` on very shallow models.

    Args:
        batch_size: prompt pairs per forward/backward; None picks it from ``memory_gb``.
        memory_gb: memory budget for one batch's autograd graph.
    """

    needs_gradients = True
    node_types = ALL_TYPES  # edges: EAP and its QK-fix / GradDrop / AtP* forms (``atpstar.edges``)

    def __init__(
        self, *, qk_fix: bool = False, grad_drop: bool = False, batch_size: int | None = None, memory_gb: float = 2.0
    ) -> None:
        self.qk_fix = qk_fix
        self.grad_drop = grad_drop
        self.batch_size = batch_size
        self.memory_gb = memory_gb

    def _validate(self, model: Model, pairs: PromptPairs, node_types: list[str]) -> None:
        if self.grad_drop and model.n_layers < 2:
            raise InputError("GradDrop needs a model with at least 2 layers (it averages over L - 1 dropped layers)")
        if self.batch_size is not None and self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1 or None; got {self.batch_size}")

    def _attribute(
        self, model: Model, pairs: PromptPairs, node_types: list[str], direction: str, cost: Cost, progress: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        out = {
            t: torch.zeros(pairs.n_pairs, *node_shape(t, model.sizes, pairs.seq_len), dtype=model.dtype)
            for t in node_types
        }
        batch = self.batch_size or _auto_batch(model, pairs.seq_len, self.memory_gb)
        with progress_bar(pairs.n_pairs, self.id, progress, unit="pair") as bar:
            for start in range(0, pairs.n_pairs, batch):
                index = torch.arange(start, min(start + batch, pairs.n_pairs))
                for t, value in self._estimate(model, pairs, index, node_types, direction, cost).items():
                    out[t][index] = value.detach().to(out[t].dtype).cpu()
                bar.update(len(index))
        return out, {}, {}

    def _attribute_edges(
        self, model: Model, pairs: PromptPairs, direction: str, cost: Cost, progress: bool
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        from ..edges.sweep import estimate_edges

        return estimate_edges(
            model, pairs, direction, cost, progress, self.batch_size, self.memory_gb, self.qk_fix, self.grad_drop
        )

    def _estimate(
        self, model: Model, pairs: PromptPairs, index: torch.Tensor, node_types: list[str], direction: str, cost: Cost
    ) -> dict[str, torch.Tensor]:
        """Per-pair estimates for the pairs ``index``: node type -> [b, *layout]."""
        base_tokens, source_tokens = (tokens[index] for tokens in pairs.base_and_source(direction))
        fix = self.qk_fix and bool({"query", "key"} & set(node_types))
        sites = {SITE_OF[t] for t in node_types} | ({"q", "k", "pattern"} if fix else set())
        n_layers, b = model.n_layers, len(index)
        with torch.inference_mode():
            source = Run(n_layers, record=sites - {"pattern"})
            model.run_layers(model.embed(source_tokens), source)
        with torch.enable_grad():
            base = Run(n_layers, record=sites | ({"resid_pre"} if self.grad_drop else set()))
            hidden = model.embed(base_tokens).detach().requires_grad_(True)
            final = model.run_layers(hidden, base)
            metric = pairs.evaluate_metric(model.unembed(final[:, -1]), index.to(final.device))
            cost.add_forward(2 * b)
            targets = [(layer, site) for layer in range(n_layers) for site in self._grad_sites(node_types, fix)]
            tensors = [base.records[site][layer] for layer, site in targets]
            resid = base.records["resid_pre"][1:] if self.grad_drop else []
            grads = torch.autograd.grad(metric.sum(), tensors + resid, retain_graph=self.grad_drop, allow_unused=True)
            cost.add_backward(b)
            by_site = {key: _or_zero(g, tensor) for key, g, tensor in zip(targets, grads, tensors)}
            plain = self._per_layer(model, base, source, node_types, by_site, range(n_layers), fix)
            if not self.grad_drop:
                return {t: torch.stack(v, 1) for t, v in plain.items()}
            return self._graddrop(
                model, base, source, node_types, targets, tensors, plain, grads[len(tensors) :], fix, cost, b
            )

    def _graddrop(
        self,
        model: Model,
        base: Run,
        source: Run,
        node_types: list[str],
        targets: list[tuple[int, str]],
        tensors: list[torch.Tensor],
        plain: dict[str, list[torch.Tensor]],
        resid_grads: tuple[Any, ...],
        fix: bool,
        cost: Cost,
        b: int,
    ) -> dict[str, torch.Tensor]:
        """Σ_l |Î_l| / (L - 1): for layers above l the plain estimate, at l zero, below l a partial backward.

        The gradient reaching resid_pre_l with layer l's write dropped is the ordinary gradient at
        resid_post_l, so each dropped layer costs one backward through layers < l only.
        """
        n_layers = model.n_layers
        # Node at layer m: dropping any of the m layers below it leaves its gradient unchanged.
        total = {t: [m * est.abs() for m, est in enumerate(plain[t])] for t in node_types}
        for drop in range(1, n_layers):
            below = [i for i, (layer, _) in enumerate(targets) if layer < drop]
            seed = resid_grads[drop]  # ∂L/∂resid_post_drop
            grads = torch.autograd.grad(
                base.records["resid_pre"][drop],
                [tensors[i] for i in below],
                grad_outputs=seed,
                retain_graph=drop < n_layers - 1,
                allow_unused=True,
            )
            cost.add_backward(b, layers_covered=drop, n_layers=n_layers)
            by_site = {targets[i]: _or_zero(g, tensors[i]) for i, g in zip(below, grads)}
            dropped = self._per_layer(model, base, source, node_types, by_site, range(drop), fix)
            for t in node_types:
                for m in range(drop):
                    total[t][m] = total[t][m] + dropped[t][m].abs()
        return {t: graddrop_combine(torch.stack(v, 1), n_layers) for t, v in total.items()}

    @staticmethod
    def _grad_sites(node_types: list[str], fix: bool) -> list[str]:
        sites = []
        for t in node_types:
            site = "pattern" if fix and t in ("query", "key") else SITE_OF[t]
            if site not in sites:
                sites.append(site)
        return sites

    def _per_layer(
        self,
        model: Model,
        base: Run,
        source: Run,
        node_types: list[str],
        grads: dict[tuple[int, str], torch.Tensor],
        layers: range,
        fix: bool,
    ) -> dict[str, list[torch.Tensor]]:
        """Estimates per node type, one [b, ...] tensor per layer in ``layers``, from gradients at sites."""
        out: dict[str, list[torch.Tensor]] = {t: [] for t in node_types}
        with torch.no_grad():
            for layer in layers:
                for t in node_types:
                    if fix and t == "query":
                        est = query_fix(
                            source.records["q"][layer],
                            base.records["k"][layer].detach(),
                            base.records["pattern"][layer].detach(),
                            grads[(layer, "pattern")],
                            base.scaling[layer],
                        )
                    elif fix and t == "key":
                        est = key_fix(
                            base.records["q"][layer].detach(),
                            base.records["k"][layer].detach(),
                            source.records["k"][layer],
                            grads[(layer, "pattern")],
                            base.scaling[layer],
                        )
                    else:
                        site = SITE_OF[t]
                        diff = source.records[site][layer] - base.records[site][layer].detach()
                        prod = diff * grads[(layer, site)]
                        est = prod if t == "neuron" else prod.sum(-1)  # [b, T, M] or [b, H|K, T]
                    out[t].append(est)
        return out


def _or_zero(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A site the metric does not depend on gets a zero gradient (autograd returns None)."""
    return torch.zeros_like(like) if grad is None else grad


def _auto_batch(model: Model, seq_len: int, memory_gb: float) -> int:
    from ..engine import element_bytes

    per_pair = 4 * model.n_layers * element_bytes(model, seq_len)
    return max(1, int(memory_gb * 2**30 // per_pair))
