"""AtP with integrated gradients (``atp+ig``; on edges: EAP-IG, Hanna et al. 2024).

Î_IG(n) = (n(x_source) - n(x_base)) · (1/m) Σ_{k=0}^{m-1} ∂L/∂n at the run whose input embeddings are
e(x_source) + (k/m)(e(x_base) - e(x_source)) — EAP-IG's schedule, applied to nodes and edges alike
(edges: ``atpstar.edges.eap``). Cost per pair: 2 forwards + m forwards and m backwards.

Shape letters: B batch, L layers, H heads, K kv-heads, T positions, E d_head, M d_mlp.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..cost import Cost
from ..memory import MemoryPlan, gradient_plan
from ..model import Model
from ..nodes import ALL_TYPES, NODE_TABLE, node_shape
from ..pairs import PromptPairs
from ..progress import progress_bar
from ..runner import Run
from ..validate import check_batching, check_count
from .base import Method, check_edge_positions, register


@register(
    "atp+ig",
    summary="AtP with gradients averaged over inputs interpolated from source to base (EAP-IG on edges)",
)
class IntegratedGradients(Method):
    """AtP whose gradient is averaged along the input path from the source to the base prompt.

    Args:
        ig_steps: m, the number of interpolated inputs (EAP-IG's default is 5 in MIB, 30 in its library).
        batch_size: prompt pairs per forward/backward (None: all at once up to ``memory_gb``).
        memory_gb: bound on the run's memory besides the weights (one batch's autograd graph and results).
        edge_positions: position-resolved edges: ``per_pair["edge"]`` [P, N, T] (see ``check_edge_positions``).
    """

    needs_gradients = True
    node_types = ALL_TYPES
    engines = ("sites", "edges")

    def __init__(
        self, *, ig_steps: int = 5, batch_size: int | None = None, memory_gb: float = 2.0, edge_positions: bool = False
    ) -> None:
        self.ig_steps = ig_steps
        self.batch_size = batch_size
        self.memory_gb = memory_gb
        self.edge_positions = edge_positions

    def expected_cost(self, model: Model, pairs: PromptPairs, node_types: list[str], info: Mapping[str, Any]) -> Cost:
        """Nodes: 2P + mP forwards, mP backwards. Edges: (2 + m)P forwards and mP backwards, plus per
        gradient pass the receiver copies (3H x q/k/v weight share, forward and backward, per pair)."""
        from ..edges.sites import qkv_share

        n, m = pairs.n_pairs, self.ig_steps
        cost = Cost()
        if any(t != "edge" for t in node_types):
            cost = cost + Cost(forward=(2 + m) * n, backward=m * n)
        if "edge" in node_types:
            copies = 3 * model.n_heads * qkv_share(model) * m * n
            cost = cost + Cost(forward=(2 + m) * n + copies, backward=m * n + copies)
        return cost

    def _validate(self, model: Model, pairs: PromptPairs, node_types: list[str]) -> None:
        self.ig_steps = check_count("ig_steps", self.ig_steps)
        self.batch_size, self.memory_gb = check_batching(self.batch_size, self.memory_gb)
        check_edge_positions(self.edge_positions, node_types)

    def memory_plan(self, model: Model, n_pairs: int, seq_len: int, node_types: list[str]) -> MemoryPlan:
        # One interpolation step at a time: AtP's gradient step (an extra recorded run is within its margin).
        return gradient_plan(
            model,
            self.id,
            n_pairs,
            seq_len,
            node_types,
            qk_fix=False,
            grad_drop=False,
            keep="all",
            top_k=1,
            batch_size=self.batch_size,
            memory_gb=self.memory_gb,
        )

    def _attribute_edges(
        self, model: Model, pairs: PromptPairs, direction: str, cost: Cost, progress: bool
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        from ..edges.sweep import estimate_edges

        return estimate_edges(
            model,
            pairs,
            direction,
            cost,
            progress,
            self.batch_size,
            self.memory_gb,
            ig_steps=self.ig_steps,
            positions=self.edge_positions,
        )

    def _attribute(
        self, model: Model, pairs: PromptPairs, node_types: list[str], direction: str, cost: Cost, progress: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        out = {
            t: torch.zeros(pairs.n_pairs, *node_shape(t, model.sizes, pairs.seq_len), dtype=model.dtype)
            for t in node_types
        }
        batch = self.memory_plan(model, pairs.n_pairs, pairs.seq_len, node_types).batch
        with progress_bar(pairs.n_pairs, self.id, progress, unit="pair") as bar:
            for start in range(0, pairs.n_pairs, batch):
                index = torch.arange(start, min(start + batch, pairs.n_pairs))
                for t, value in self._estimate(model, pairs, index, node_types, direction, cost).items():
                    out[t][index] = value.to(out[t].dtype).cpu()
                bar.update(len(index))
        return out, {}, {}

    def _estimate(
        self, model: Model, pairs: PromptPairs, index: torch.Tensor, node_types: list[str], direction: str, cost: Cost
    ) -> dict[str, torch.Tensor]:
        base_tokens, source_tokens = (tokens[index] for tokens in pairs.base_and_source(direction))
        sites = sorted({NODE_TABLE[t].site for t in node_types})
        n_layers, b = model.n_layers, len(index)
        with torch.no_grad():
            base_embed, source_embed = model.embed(base_tokens), model.embed(source_tokens)
            base, source = Run(n_layers, record=sites), Run(n_layers, record=sites)
            model.run_layers(base_embed, base)
            model.run_layers(source_embed, source)
        cost.add_forward(2 * b)
        total: dict[tuple[int, str], torch.Tensor] = {}
        for k in range(self.ig_steps):
            with torch.enable_grad():
                point = (source_embed + (k / self.ig_steps) * (base_embed - source_embed)).requires_grad_(True)
                run = Run(n_layers, record=sites)
                final = model.run_layers(point, run)
                metric = pairs.evaluate_metric(model.unembed(final[:, -1]), index.to(final.device))
                keys = [(layer, site) for layer in range(n_layers) for site in sites]
                tensors = [run.get(site, layer) for layer, site in keys]
                grads = torch.autograd.grad(metric.sum(), tensors, allow_unused=True)
            cost.add_forward(b)
            cost.add_backward(b)
            for key, grad, tensor in zip(keys, grads, tensors):
                grad = torch.zeros_like(tensor) if grad is None else grad.detach()
                total[key] = grad if k == 0 else total[key] + grad
        out = {}
        with torch.no_grad():
            for t in node_types:
                row = NODE_TABLE[t]
                per_layer = []
                for layer in range(n_layers):
                    diff = source.get(row.site, layer) - base.get(row.site, layer)
                    prod = diff * total[(layer, row.site)] / self.ig_steps
                    per_layer.append(prod.sum(-1) if row.vector else prod)  # [B, H|K, T] or [B, T, M]
                out[t] = torch.stack(per_layer, 1)
        return out
