"""AtP with integrated gradients (``atp+ig``; on edges: EAP-IG, Hanna et al. 2024).

Î_IG(n) = (n(x_source) - n(x_base)) · (1/m) Σ_{k=0}^{m-1} ∂L/∂n at the run whose input embeddings are
e(x_source) + (k/m)(e(x_base) - e(x_source)) — EAP-IG's schedule, applied to nodes and edges alike
(edges: ``atpstar.edges.eap``). It is AtP with its gradient taken on that path (``gradients.path``), as
Captum builds LayerIntegratedGradients on IntegratedGradients: the batch loop, out-of-memory retry,
per-pair sinks (``keep``) and memory plan are AtP's. Cost per pair: 2 forwards + m forwards and m backwards.

Shape letters: L layers, H heads, K kv-heads, T positions, E d_head, M d_mlp.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..cost import Cost
from ..gradients import Points, path
from ..model import Model
from ..pairs import PromptPairs
from ..spaces import space_class
from ..validate import check_count
from .atp import AttributionPatching
from .base import register


@register(
    "atp+ig",
    summary="AtP with gradients averaged over inputs interpolated from source to base (EAP-IG on edges)",
)
class IntegratedGradients(AttributionPatching):
    """AtP whose gradient is averaged along the input path from the source to the base prompt.

    ``per_pair`` holds signed Î_IG; ``scores`` is the mean of absolute per-pair values. Half-precision
    models compute and keep the estimates in float32, as AtP does.

    Args:
        ig_steps: m, the number of interpolated inputs (EAP-IG's default is 5 in MIB, 30 in its library).
        batch_size, memory_gb, keep, top_k, out_dir, edge_positions: as for ``atp``
            (``AttributionPatching``); the memory plan adds the gradients summed over the path.
    """

    fixed_options = frozenset({"qk_fix", "grad_drop"})  # options of the base-run estimators only
    qk_fix = False
    grad_drop = False

    ig_steps: int = 5

    def _points(self) -> Points:
        return path(self.ig_steps)

    def expected_cost(self, model: Model, pairs: PromptPairs, node_types: list[str], info: Mapping[str, Any]) -> Cost:
        """Nodes: 2P + mP forwards, mP backwards. Edges: (2 + m)P forwards and mP backwards, plus per
        gradient pass the receiver copies (3H x q/k/v weight share, forward and backward, per pair)."""
        from ..edges.sites import qkv_share

        n, m = pairs.n_pairs, self.ig_steps
        engines = {space_class(t).engine for t in node_types}
        cost = Cost()
        for engine in engines & {"sites", "latents"}:  # one gradient step per engine
            cost = cost + Cost(forward=(2 + m) * n, backward=m * n)
        if "edges" in engines:
            copies = 3 * model.n_heads * qkv_share(model) * m * n
            cost = cost + Cost(forward=(2 + m) * n + copies, backward=m * n + copies)
        return cost

    def _validate(self, model: Model, pairs: PromptPairs, node_types: list[str]) -> None:
        self.ig_steps = check_count("ig_steps", self.ig_steps)
        super()._validate(model, pairs, node_types)
