"""Pure tensor math: the QK fix and GradDrop's combination. No hooks, no model.

Shape letters: B batch, H query heads, K kv-heads, T query positions, S key positions, E d_head.
"""

from __future__ import annotations

import torch

from .runner import expand_kv


def causal_scores(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention logits with the causal mask as -inf: q [B, H, T, E], k [B, K, S, E] -> [B, H, T, S]."""
    scores = torch.matmul(q, expand_kv(k, q.shape[1]).transpose(-1, -2)) * scaling
    n_q, n_k = scores.shape[-2:]
    visible = torch.arange(n_k, device=q.device)[None, :] <= torch.arange(n_k - n_q, n_k, device=q.device)[:, None]
    return scores.masked_fill(~visible, float("-inf"))


def query_fix(
    q_source: torch.Tensor, k_base: torch.Tensor, pattern: torch.Tensor, grad_pattern: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Î_Q(q_t) = Σ_s (A'[t, s] - A[t, s]) G[t, s], with A' the exact softmax for the patched query row.

    Args:
        q_source: [B, H, T, E] queries of the source run (post-rotary).
        k_base: [B, K, T, E] keys of the base run.
        pattern: [B, H, T, T] base attention pattern A; grad_pattern: [B, H, T, T] G = dL/dA.

    Returns:
        [B, H, T] one estimate per query node.
    """
    new_pattern = torch.softmax(causal_scores(q_source, k_base, scaling), dim=-1)
    return ((new_pattern - pattern) * grad_pattern).sum(-1)


def key_fix(
    q_base: torch.Tensor,
    k_base: torch.Tensor,
    k_source: torch.Tensor,
    grad_pattern: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Î_K(k_s) = Σ_t (a' - a)(G[t, s] - ḡ[t, s]), exact softmax for one changed logit per row.

    a = A[t, s], a' = sigmoid(logit(a) + Δ[t, s]) with Δ = q_t · (k_s(source) - k_s(base)) · scaling, and ḡ the
    mean of G over the row's other keys weighted by their renormalised probabilities. Everything is in
    log space so saturated rows (a ≈ 0 with large Δ, a ≈ 1) keep full precision; for the dominant key of
    each row, 1 - a and ḡ come from a leave-that-key-out softmax rather than by subtraction. O(T²·E).

    Args:
        q_base: [B, H, T, E]; k_base, k_source: [B, K, T, E]; grad_pattern: [B, H, T, T] (G = dL/dA).

    Returns:
        [B, K, T] one estimate per key node, summed over the query heads of its group and over queries.
    """
    scores = causal_scores(q_base, k_base, scaling)  # [B, H, T, S]
    visible = torch.isfinite(scores)
    delta = torch.matmul(q_base, expand_kv(k_source - k_base, q_base.shape[1]).transpose(-1, -2)) * scaling
    log_total = torch.logsumexp(scores, dim=-1, keepdim=True)
    log_a = scores - log_total  # [B, H, T, S]
    prob = log_a.exp()
    grad = torch.where(visible, grad_pattern, torch.zeros_like(grad_pattern))
    weighted_total = (prob * grad).sum(-1, keepdim=True)  # r_t

    # Ordinary keys have a <= 1/2: subtraction is safe. The dominant key of each row uses leave-one-out sums.
    dominant = torch.nn.functional.one_hot(scores.argmax(-1), scores.shape[-1]).bool()  # [B, H, T, S]
    others = scores.masked_fill(dominant, float("-inf"))
    log_others = torch.logsumexp(others, dim=-1, keepdim=True)  # log Σ_{u≠s*} e^{S_u}
    others_mean = (torch.softmax(others, dim=-1).nan_to_num(0.0) * grad).sum(-1, keepdim=True)
    log_one_minus_a = torch.where(dominant, log_others - log_total, torch.log1p(-prob.clamp(max=0.5)))
    mean_other = torch.where(dominant, others_mean, (weighted_total - prob * grad) / (1 - prob).clamp(min=0.5))

    new_logit = log_a - log_one_minus_a + delta
    change = torch.where(
        dominant,
        log_one_minus_a.exp() - torch.sigmoid(-new_logit),  # (1 - a) - (1 - a'): exact when a ≈ 1
        torch.sigmoid(new_logit) - prob,
    )
    usable = visible & torch.isfinite(log_one_minus_a)  # a key alone in its row changes nothing
    per_row = torch.where(usable, change * (grad - mean_other), torch.zeros_like(change))
    per_head = per_row.sum(-2)  # [B, H, S]
    batch, heads, n_keys = per_head.shape
    return per_head.view(batch, k_base.shape[1], heads // k_base.shape[1], n_keys).sum(2)  # [B, K, S]


def graddrop_combine(per_layer_abs_sum: torch.Tensor, n_layers: int) -> torch.Tensor:
    """ĉ_GD = Σ_l |Î_l| / (L - 1), given the sum over dropped layers of absolute estimates."""
    return per_layer_abs_sum / (n_layers - 1)
