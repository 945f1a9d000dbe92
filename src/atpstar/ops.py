"""Pure tensor math: attention patterns, the QK fix (nodes; the changed patterns of edges) and GradDrop's
combination. No hooks, no model.

Shape letters: B batch, H query heads, K kv-heads, T query positions, S key positions, E d_head.
"""

from __future__ import annotations

import torch


def expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, K, S, E] -> [B, H, S, E]: query head h reads kv head h // (H / K), as transformers' repeat_kv."""
    groups = n_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype estimates are computed and kept in: float32 for half-precision models, else the model's own.

    bfloat16 keeps 8 bits of mantissa: differences of nearby activations and sums over d_head or over
    layers lose most of their digits, so half-precision activations and gradients are upcast first.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in ``accumulation_dtype(x.dtype)`` (no copy for float32/float64)."""
    return x.to(accumulation_dtype(x.dtype))


def visible_keys(
    n_queries: int, n_keys: int, window: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """The one attention mask: bool [T, S], queries being the last T of the S key positions.

    Query i sits at key position S - T + i; it sees key s when s <= S - T + i (causal) and, with a
    sliding window w, when S - T + i - s < w (transformers' ``sliding_window_overlay``). Only position
    differences matter, so a run that starts late or a prefix cache trimmed to the window uses the
    same mask.
    """
    query_pos = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]  # [T, 1]
    key_pos = torch.arange(n_keys, device=device)[None, :]  # [1, S]
    visible = key_pos <= query_pos
    if window is not None:
        visible = visible & (query_pos - key_pos < window)
    return visible


def softcap(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Score soft-capping c·tanh(x / c) (Gemma-2), in the order transformers computes it; None: unchanged."""
    return scores if cap is None else torch.tanh(scores / cap) * cap


def raw_scores(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """Scaled dot products before soft-cap and mask: q [B, H, T, E], k [B, K, S, E] -> [B, H, T, S]."""
    return torch.matmul(q, expand_kv(k, q.shape[1]).transpose(-1, -2)) * scaling


def attention_scores(
    q: torch.Tensor, k: torch.Tensor, scaling: float, cap: float | None = None, window: int | None = None
) -> torch.Tensor:
    """Attention logits (soft-capped) with masked entries -inf: q [B, H, T, E], k [B, K, S, E] -> [B, H, T, S]."""
    scores = softcap(raw_scores(q, k, scaling), cap)
    visible = visible_keys(q.shape[-2], k.shape[-2], window, q.device)
    compute_dtype = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype
    return scores.to(compute_dtype).masked_fill(~visible, float("-inf"))


def attention_pattern(
    q: torch.Tensor, k: torch.Tensor, scaling: float, cap: float | None = None, window: int | None = None
) -> torch.Tensor:
    """softmax of ``attention_scores``: [B, H, T, S], in q's dtype.

    Softmax runs in float32 for half-precision inputs (as the models' eager attention does) and in
    the input precision otherwise, so float64 runs stay float64.
    """
    return torch.softmax(attention_scores(q, k, scaling, cap, window), dim=-1).to(q.dtype)


def one_key_patterns(
    q: torch.Tensor,
    k: torch.Tensor,
    new_k: torch.Tensor,
    scaling: float,
    cap: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Patterns with the key of one position p (p = 0 .. S-1) taken from ``new_k``: [X*S, H, T, S].

    Args:
        q: [X, H, T, E]; k, new_k: [X, H, S, E] (keys per query head).
        scaling, cap, window: the layer's score scaling, soft-cap and sliding window.
    """
    x, heads, n_pos, e = k.shape
    one = torch.eye(n_pos, dtype=torch.bool, device=k.device)[None, :, None, :, None]  # [1, S(p), 1, S, 1]
    mixed = torch.where(one, new_k[:, None], k[:, None])  # [X, S(p), H, S, E]
    q_rep = q[:, None].expand(x, n_pos, heads, q.shape[-2], e)  # [X, S(p), H, T, E]
    return attention_pattern(
        q_rep.reshape(x * n_pos, heads, q.shape[-2], e),  # [X·S(p), H, T, E]
        mixed.reshape(x * n_pos, heads, n_pos, e),  # [X·S(p), H, S, E]
        scaling,
        cap,
        window,
    )


def query_fix(
    q_source: torch.Tensor,
    k_base: torch.Tensor,
    pattern: torch.Tensor,
    grad_pattern: torch.Tensor,
    scaling: float,
    cap: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Î_Q(q_t) = Σ_s (A'[t, s] - A[t, s]) G[t, s], with A' the exact (capped, masked) softmax for the patched row.

    Args:
        q_source: [B, H, T, E] queries of the source run (post-rotary, post-QK-norm).
        k_base: [B, K, T, E] keys of the base run.
        pattern: [B, H, T, T] base attention pattern A; grad_pattern: [B, H, T, T] G = dL/dA.
        scaling, cap, window: the layer's score scaling, soft-cap and sliding window.

    Returns:
        [B, H, T] one estimate per query node.
    """
    new_pattern = torch.softmax(attention_scores(q_source, k_base, scaling, cap, window), dim=-1)
    return ((new_pattern - pattern) * grad_pattern).sum(-1)


def key_fix(
    q_base: torch.Tensor,
    k_base: torch.Tensor,
    k_source: torch.Tensor,
    grad_pattern: torch.Tensor,
    scaling: float,
    cap: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Î_K(k_s) = Σ_t (a' - a)(G[t, s] - ḡ[t, s]), exact softmax for one changed logit per row.

    a = A[t, s], a' = sigmoid(logit(a) + Δ[t, s]) with Δ the change of the (soft-capped) score of key s
    in row t: Δ = c·tanh((x + δ)/c) - c·tanh(x/c) for raw score x = q_t·k_s·scaling and
    δ = q_t·(k_s(source) - k_s(base))·scaling (Δ = δ without a cap). ḡ is the mean of G over the row's
    other keys weighted by their renormalised probabilities. Rows whose causal/sliding window excludes
    s are untouched. Everything is in log space so saturated rows (a ≈ 0 with large Δ, a ≈ 1) keep
    full precision; for the dominant key of each row, 1 - a and ḡ come from a leave-that-key-out
    softmax rather than by subtraction. O(T²·E).

    Args:
        q_base: [B, H, T, E]; k_base, k_source: [B, K, T, E]; grad_pattern: [B, H, T, T] (G = dL/dA).
        scaling, cap, window: the layer's score scaling, soft-cap and sliding window.

    Returns:
        [B, K, T] one estimate per key node, summed over the query heads of its group and over queries.
    """
    raw = raw_scores(q_base, k_base, scaling)  # [B, H, T, S]
    visible = visible_keys(q_base.shape[-2], k_base.shape[-2], window, q_base.device)  # [T, S]
    scores = softcap(raw, cap).masked_fill(~visible, float("-inf"))
    raw_delta = raw_scores(q_base, k_source - k_base, scaling)
    delta = raw_delta if cap is None else softcap(raw + raw_delta, cap) - softcap(raw, cap)
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


# Subsampling statistics and the Welch bound (Kramár et al. 2024) -------------------------------------------------


def welford_merge(
    count: torch.Tensor,
    mean: torch.Tensor,
    m2: torch.Tensor,
    batch_count: torch.Tensor,
    batch_mean: torch.Tensor,
    batch_m2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge running (count, mean, M2) with a batch's (count, mean, M2), elementwise (Chan et al.'s
    parallel form of Welford's update; M2 = Σ (x - mean)²). Groups with count 0 keep mean 0, M2 0."""
    total = count + batch_count
    safe = total.clamp(min=1)
    delta = batch_mean - mean
    new_mean = mean + delta * batch_count / safe
    new_m2 = m2 + batch_m2 + delta.square() * count * batch_count / safe
    return total, new_mean, new_m2


def _betacf(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, max_iter: int = 10000) -> torch.Tensor:
    """Continued fraction of the incomplete beta function (modified Lentz), elementwise, float64."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = torch.ones_like(x)
    d = 1.0 - qab * x / qap
    d = torch.where(d.abs() < tiny, torch.full_like(d, tiny), d)
    d = 1.0 / d
    h = d.clone()
    for m in range(1, max_iter + 1):
        m2 = 2.0 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = torch.where(d.abs() < tiny, torch.full_like(d, tiny), d)
        c = 1.0 + aa / c
        c = torch.where(c.abs() < tiny, torch.full_like(c, tiny), c)
        d = 1.0 / d
        h = h * d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = torch.where(d.abs() < tiny, torch.full_like(d, tiny), d)
        c = 1.0 + aa / c
        c = torch.where(c.abs() < tiny, torch.full_like(c, tiny), c)
        d = 1.0 / d
        step = d * c
        h = h * step
        if bool(((step - 1.0).abs() < 1e-15).all()):
            break
    return h


def betainc(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Regularised incomplete beta I_x(a, b), elementwise in float64 (torch has none; scipy is not a dependency)."""
    a, b, x = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float64) for v in (a, b, x)))
    x = x.clamp(0.0, 1.0)
    inner = (x > 0) & (x < 1)
    xs = torch.where(inner, x, torch.full_like(x, 0.5))
    log_front = torch.lgamma(a + b) - torch.lgamma(a) - torch.lgamma(b) + a * torch.log(xs) + b * torch.log1p(-xs)
    # The continued fraction converges fast for x < (a + 1) / (a + b + 2); otherwise use I_x(a,b) = 1 - I_{1-x}(b,a).
    direct = xs < (a + 1.0) / (a + b + 2.0)
    aa, bb, xx = torch.where(direct, a, b), torch.where(direct, b, a), torch.where(direct, xs, 1.0 - xs)
    value = torch.exp(log_front) * _betacf(aa, bb, xx) / aa
    value = torch.where(direct, value, 1.0 - value)
    return torch.where(inner, value, torch.where(x <= 0, torch.zeros_like(x), torch.ones_like(x)))


def student_t_cdf(t: torch.Tensor, df: torch.Tensor) -> torch.Tensor:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (real, > 0), elementwise, float64."""
    t, df = torch.broadcast_tensors(torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(df, dtype=torch.float64))
    tail = 0.5 * betainc(df / 2.0, torch.full_like(df, 0.5), df / (df + t.square()))  # P(T > |t|)
    return torch.where(t >= 0, 1.0 - tail, tail)


def student_t_quantile(prob: float, df: torch.Tensor) -> torch.Tensor:
    """The ``prob`` quantile (prob in (0.5, 1)) of Student's t per entry of ``df``, by bisection on the CDF.

    Exact to ~1e-12 relative; the tail probability 1 - prob may be tiny (1e-12), as union bounds need.
    """
    df = torch.as_tensor(df, dtype=torch.float64)
    tail = torch.full_like(df, 1.0 - prob)
    # The t quantile is below the Cauchy one (df = 1), tan(pi (prob - 1/2)), for every df >= 1;
    # for df < 1 grow the bracket until it holds.
    high = torch.full_like(df, float(torch.tan(torch.tensor(torch.pi * (prob - 0.5), dtype=torch.float64))) + 1.0)
    for _ in range(200):
        short = 0.5 * betainc(df / 2.0, torch.full_like(df, 0.5), df / (df + high.square())) > tail  # P(T > high)
        if not bool(short.any()):
            break
        high = torch.where(short, high * 4.0, high)
    low = torch.zeros_like(df)
    for _ in range(200):
        mid = 0.5 * (low + high)
        above = 0.5 * betainc(df / 2.0, torch.full_like(df, 0.5), df / (df + mid.square())) > tail
        low, high = torch.where(above, mid, low), torch.where(above, high, mid)
        if bool(((high - low) <= 1e-13 * high.clamp(min=1.0)).all()):
            break
    return 0.5 * (low + high)


def welch_se_df(variances: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard error and Welch–Satterthwaite degrees of freedom of a weighted sum of group means.

    For ĉ = (1/G') Σ_g ± mean_g over independent groups g (in/out groups of every pair), the scale factor
    cancels in df: se² ∝ Σ_g s_g²/n_g, df = (Σ_g s_g²/n_g)² / Σ_g (s_g²/n_g)² / (n_g - 1).

    Args:
        variances: [G, ...] unbiased sample variances s_g² per group.
        counts: [G, ...] sample counts n_g per group (each >= 2 for a finite answer).

    Returns:
        (sqrt(Σ_g s_g²/n_g) [...], df [...]); df is inf where every variance is 0 and nan where a count is < 2.
    """
    total, denom = welch_sums(variances, counts)
    return welch_finish(total, denom, (counts < 2).any(0))


def welch_sums(variances: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sums over groups ``welch_se_df`` needs, (Σ_g s_g²/n_g, Σ_g (s_g²/n_g)² / (n_g - 1)), each [...]:
    sums over disjoint sets of groups add up to those of their union."""
    terms = variances / counts  # [G, ...]
    return terms.sum(0), (terms.square() / (counts - 1)).sum(0)


def welch_finish(total: torch.Tensor, denom: torch.Tensor, short: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``welch_se_df`` from ``welch_sums`` and ``short`` (bool: some group has fewer than 2 samples)."""
    df = torch.where(denom > 0, total.square() / denom.clamp(min=1e-300), torch.full_like(total, float("inf")))
    df = torch.where(short, torch.full_like(df, float("nan")), df)
    return total.sqrt(), df
