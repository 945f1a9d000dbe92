"""ops: the vectorised QK fix against a per-row softmax recomputation, including saturated extremes."""

from __future__ import annotations

import pytest
import torch

from atpstar import ops
from atpstar.ops import attention_scores, graddrop_combine, key_fix, query_fix
from reference import brute

REL = 1e-6


def brute_query(q_source, k_base, pattern, grad, scaling, cap=None, window=None):
    return torch.stack([brute.query_fix(q_source[b], k_base[b], pattern[b], grad[b], scaling, cap, window)
                        for b in range(len(q_source))])


def brute_key(q_base, k_base, k_source, grad, scaling, cap=None, window=None):
    return torch.stack([brute.key_fix(q_base[b], k_base[b], k_source[b], grad[b], scaling, cap, window)
                        for b in range(len(q_base))])


def pattern_of(q, k, scaling, cap=None, window=None):
    return torch.softmax(attention_scores(q, k, scaling, cap, window), -1)


def assert_elementwise(actual, expected, rel=REL, floor=1e-9):
    """|actual - expected| <= rel (|expected| + floor): relative even for ~1e-9 values; floor absorbs round-off on zeros."""
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all(), "NaN/inf in the fix"
    bound = rel * expected.abs() + rel * floor
    assert bool(((actual - expected).abs() <= bound).all()), (actual, expected)


def assert_close_scaled(actual, expected, rel=REL):
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all(), "NaN/inf in the fix"
    assert float((actual - expected).abs().max()) <= rel * float(expected.abs().max()) + 1e-15


def random_inputs(seed, heads=4, kv_heads=2, positions=6, d_head=3, q_scale=1.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    q_base = rand(2, heads, positions, d_head) * q_scale
    q_source = q_base + rand(2, heads, positions, d_head) * q_scale
    k_base = rand(2, kv_heads, positions, d_head) * q_scale
    k_source = k_base + rand(2, kv_heads, positions, d_head) * q_scale
    grad = rand(2, heads, positions, positions)
    return q_base, q_source, k_base, k_source, grad


@pytest.mark.parametrize("q_scale", [1.0, 6.0])  # 6: many rows saturated (probabilities ~1 and ~1e-20)
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_fixes_match_brute_force_on_random_tensors(q_scale, heads, kv_heads):
    q_base, q_source, k_base, k_source, grad = random_inputs(int(q_scale) + heads + kv_heads, heads, kv_heads, q_scale=q_scale)
    scaling = 3**-0.5
    pattern = pattern_of(q_base, k_base, scaling)
    assert_close_scaled(query_fix(q_source, k_base, pattern, grad, scaling), brute_query(q_source, k_base, pattern, grad, scaling))
    assert_close_scaled(key_fix(q_base, k_base, k_source, grad, scaling), brute_key(q_base, k_base, k_source, grad, scaling))


@pytest.mark.parametrize("cap, window", [(2.0, None), (None, 3), (1.5, 2), (40.0, 1)])
def test_fixes_under_soft_cap_and_window_match_brute_force(cap, window):
    """Soft-caps that bind (|scores| >> cap on q_scale 6) and windows shorter than the prompt."""
    q_base, q_source, k_base, k_source, grad = random_inputs(11, 4, 2, positions=7, q_scale=6.0)
    scaling = 3**-0.5
    pattern = pattern_of(q_base, k_base, scaling, cap, window)
    fixed_q = query_fix(q_source, k_base, pattern, grad, scaling, cap, window)
    fixed_k = key_fix(q_base, k_base, k_source, grad, scaling, cap, window)
    assert_close_scaled(fixed_q, brute_query(q_source, k_base, pattern, grad, scaling, cap, window), 1e-12)
    assert_close_scaled(fixed_k, brute_key(q_base, k_base, k_source, grad, scaling, cap, window), 1e-12)
    # The features change the answer, so this test can fail if they were ignored.
    assert float((fixed_k - key_fix(q_base, k_base, k_source, grad, scaling)).abs().max()) > 1e-3


def test_visible_keys_matches_transformers_sliding_window_rule():
    from atpstar.ops import visible_keys

    for n_q, n_k, window in [(5, 5, None), (5, 5, 2), (3, 7, 3), (1, 6, 4), (4, 4, 1)]:
        expected = torch.zeros(n_q, n_k, dtype=torch.bool)
        for i in range(n_q):
            q_pos = n_k - n_q + i
            for s in range(n_k):
                expected[i, s] = s <= q_pos and (window is None or s > q_pos - window)
        assert torch.equal(visible_keys(n_q, n_k, window), expected), (n_q, n_k, window)


def test_masked_gradient_entries_are_ignored():
    q_base, q_source, k_base, k_source, grad = random_inputs(3)
    pattern = pattern_of(q_base, k_base, 0.5)
    garbage = grad + torch.full_like(grad, 1e6).triu(1)  # only above the diagonal: masked entries
    assert_close_scaled(key_fix(q_base, k_base, k_source, garbage, 0.5), key_fix(q_base, k_base, k_source, grad, 0.5), 1e-12)
    assert_close_scaled(query_fix(q_source, k_base, pattern, garbage, 0.5), query_fix(q_source, k_base, pattern, grad, 0.5), 1e-12)


def _one_dim(keys, keys_source, positions, seed=0):
    """E = 1, q = 1 at every position, scaling 1: S[t, s] = k_s, Δ[t, s] = k_s(source) - k_s(base)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.ones(1, 1, positions, 1, dtype=torch.float64)
    k_base = torch.tensor(keys, dtype=torch.float64).view(1, 1, positions, 1)
    k_source = torch.tensor(keys_source, dtype=torch.float64).view(1, 1, positions, 1)
    grad = torch.randn(1, 1, positions, positions, generator=gen, dtype=torch.float64)
    return q, k_base, k_source, grad


def test_key_fix_tiny_probability_large_positive_change():
    """a ~ 1e-30 and Δ = +50: AtP sees ~0, the exact change is ~e^-19; never clamp small probabilities."""
    q, k_base, k_source, grad = _one_dim([0.0, -69.0, 0.3, -0.2, 0.1], [0.0, -19.0, 0.3, -0.2, 0.1], 5)
    expected = brute_key(q, k_base, k_source, grad, 1.0)
    actual = key_fix(q, k_base, k_source, grad, 1.0)
    assert float(expected[0, 0, 1].abs()) > 1e-10
    assert_elementwise(actual, expected)


def test_key_fix_dominant_key_large_negative_change():
    """a = 1 to float64 precision (others ~e^-40) and Δ = -50: the key loses almost all its weight."""
    q, k_base, k_source, grad = _one_dim([0.0, 40.0, 0.0, 0.5, -1.0], [0.0, -10.0, 0.0, 0.5, -1.0], 5)
    pattern = pattern_of(q, k_base, 1.0)
    assert float(pattern[0, 0, 2, 1]) == 1.0  # saturated to exactly 1
    expected = brute_key(q, k_base, k_source, grad, 1.0)
    actual = key_fix(q, k_base, k_source, grad, 1.0)
    assert float(expected[0, 0, 1].abs()) > 0.1
    assert_elementwise(actual, expected)


def test_key_fix_dominant_key_small_change():
    """a ≈ 1 - 1e-17 with a small Δ: the change is ~1e-17 and must not be lost to 1 - a = 0."""
    q, k_base, k_source, grad = _one_dim([0.0, 40.0, 0.0], [0.0, 40.5, 0.0], 3)
    expected_row = []
    for t in (1, 2):
        scores = k_base[0, 0, : t + 1, 0].clone()
        old = torch.softmax(scores, 0)
        new_scores = scores.clone()
        new_scores[1] += 0.5
        new = torch.softmax(new_scores, 0)
        # old/new of the small entries are accurate in float64 (no cancellation); the big one by complement.
        change = torch.cat([new[:1] - old[:1], -(new[:1] - old[:1] + (new[2:] - old[2:]).sum()).view(1), new[2:] - old[2:]])
        expected_row.append((change * grad[0, 0, t, : t + 1]).sum())
    expected = torch.stack(expected_row).sum()
    actual = key_fix(q, k_base, k_source, grad, 1.0)[0, 0, 1]
    assert abs(float(expected)) > 1e-20
    assert abs(float(actual - expected)) <= 1e-6 * abs(float(expected))


def test_single_visible_key_contributes_nothing():
    """Row 0 sees only key 0 (probability exactly 1): changing that key or query changes nothing there."""
    q = torch.randn(1, 1, 1, 2, dtype=torch.float64)
    k_base = torch.randn(1, 1, 1, 2, dtype=torch.float64)
    k_source = k_base + 100.0
    grad = torch.randn(1, 1, 1, 1, dtype=torch.float64)
    pattern = pattern_of(q, k_base, 1.0)
    assert float(pattern) == 1.0
    assert float(key_fix(q, k_base, k_source, grad, 1.0)) == 0.0
    assert float(query_fix(q * -50, k_base, pattern, grad, 1.0)) == 0.0


def test_query_fix_saturated_rows():
    """A source query that flips which key a saturated row attends to: the change is ~1 per row."""
    q, k_base, _, grad = _one_dim([0.0, 1.0, -1.0, 2.0], [0.0] * 4, 4)
    q_base = q * 60.0  # rows one-hot on their largest key
    q_source = q * -60.0  # one-hot on their smallest key
    pattern = pattern_of(q_base, k_base, 1.0)
    expected = brute_query(q_source, k_base, pattern, grad, 1.0)
    actual = query_fix(q_source, k_base, pattern, grad, 1.0)
    assert float(expected.abs().max()) > 0.1
    assert_elementwise(actual, expected)


def test_ties_and_float32_stay_finite():
    q = torch.ones(1, 2, 4, 1)
    k_base = torch.zeros(1, 1, 4, 1)  # every row uniform: ties for the dominant key
    k_source = torch.tensor([80.0, -80.0, 30.0, 0.0]).view(1, 1, 4, 1)
    grad = torch.randn(1, 2, 4, 4)
    expected = brute_key(q.double(), k_base.double(), k_source.double(), grad.double(), 1.0)
    actual = key_fix(q, k_base, k_source, grad, 1.0)
    assert actual.dtype == torch.float32
    assert torch.isfinite(actual).all()
    assert float((actual.double() - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


def test_graddrop_combine():
    total = torch.tensor([0.0, 3.0, 6.0])
    assert torch.equal(graddrop_combine(total, 4), total / 3)


def test_one_key_patterns_change_one_key_at_a_time():
    """Block p of ``one_key_patterns`` is the pattern with key p alone taken from the new keys."""
    torch.manual_seed(5)
    q, k, new_k = (torch.randn(2, 3, 4, 5, dtype=torch.float64) for _ in range(3))
    got = ops.one_key_patterns(q, k, new_k, 0.4, cap=2.0, window=3).view(2, 4, 3, 4, 4)  # [X, p, H, T, S]
    for p in range(4):
        mixed = k.clone()
        mixed[:, :, p] = new_k[:, :, p]
        torch.testing.assert_close(got[:, p], ops.attention_pattern(q, mixed, 0.4, 2.0, 3), rtol=0, atol=0)
