"""gradients: the shared gradient step, against hook-based references and GradDrop's separate backwards."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from atpstar.cost import Cost
from atpstar.errors import InputError
from atpstar.gradients import AT_BASE, Points, Tape, atp_estimate, gradient_step, path, summed_over_points
from atpstar.nodes import NODE_TABLE
from reference import brute, hooks
from reference.models import assert_rel_close, build_hf, load, make_pairs

ALL = ["neuron", "query", "key", "value", "head"]
SITES = [NODE_TABLE[t].site for t in ALL]


def test_plain_step_gives_atp_and_counts_its_passes():
    model = load(build_hf("llama", seed=4))
    pairs = make_pairs(n_pairs=3)
    expected = hooks.atp(hooks.reference_copy(model.hf_model), pairs, "denoising")
    cost = Cost()
    with gradient_step(
        model, pairs, torch.arange(3), direction="denoising", sites=[], diff_sites=SITES, grad_sites=SITES, cost=cost
    ) as step:
        _check_plain(model, step, cost, expected)


def _check_plain(model, step, cost, expected):
    assert step.metric.shape == (3,)
    assert (cost.forward, cost.backward) == (6.0, 0.0)  # forwards only until the backward runs
    got: dict[str, dict[int, torch.Tensor]] = {t: {} for t in ALL}
    order = []

    def consume(layer: int, site: str, grad: torch.Tensor) -> None:
        order.append((layer, site))
        assert grad.shape == step.diffs[(layer, site)].shape
        for t in ALL:
            if NODE_TABLE[t].site == site:
                got[t][layer] = atp_estimate(step, t, layer, grad)

    step.backward(consume)
    assert sorted(order) == sorted((layer, site) for layer in range(model.n_layers) for site in SITES)
    assert [layer for layer, _ in order] == sorted((layer for layer, _ in order), reverse=True)  # top layer first
    for t in ALL:
        estimate = torch.stack([got[t][layer] for layer in range(model.n_layers)], 1)
        assert_rel_close(estimate, expected[t], 1e-6, t)
    assert (cost.forward, cost.backward) == (6.0, 3.0)


def test_dropped_gradients_equal_separate_dropped_backwards():
    model = load(build_hf("gpt2", n_layers=3, seed=5))
    pairs = make_pairs()
    cost = Cost()
    with gradient_step(
        model, pairs, torch.arange(2), direction="noising", sites=[], diff_sites=SITES, grad_sites=SITES, cost=cost,
        grad_drop=True,
    ) as step:  # fmt: skip
        _check_dropped(model, pairs, step)
    assert cost.backward == 2 * (1 + 1 / 3 + 2 / 3)


def _check_dropped(model, pairs, step):
    step.backward(lambda layer, site, grad: None)
    seen, got = [], {}

    def consume(layer: int, site: str, grad: torch.Tensor) -> None:
        for t in ALL:
            if NODE_TABLE[t].site == site:
                got[(t, layer)] = atp_estimate(step, t, layer, grad)

    for drop in step.dropped(consume):
        seen.append(drop)
        expected = brute.atp(model, pairs, ALL, drop_layer=drop)
        assert sorted({layer for _, layer in got}) == list(range(drop))
        for (t, layer), value in got.items():
            assert_rel_close(value, expected[t][:, layer], 1e-6, f"drop {drop} {t} layer {layer}")
        got.clear()
    assert seen == [1, 2]


def test_gradients_and_differences_are_freed_and_hooks_removed():
    """The consumer's gradients die once it returns, released differences die, no hook outlives the step,
    and the step holds no base activation at the diff sites (only source - base)."""
    model = load(build_hf("gpt_neox", n_layers=2, seed=6))
    pairs = make_pairs()
    grads: list[weakref.ref[torch.Tensor]] = []
    with gradient_step(
        model, pairs, torch.arange(2), direction="noising", sites=[], diff_sites=SITES, grad_sites=SITES, cost=Cost()
    ) as step:
        assert not step.base.records and all(r is None for v in step.source.records.values() for r in v)
        diffs = [weakref.ref(d) for d in step.diffs.values()]
        assert len(diffs) == model.n_layers * len(SITES)
        hooks = list(step.tape._hooks)

        def consume(layer: int, site: str, grad: torch.Tensor) -> None:
            grads.append(weakref.ref(grad))
            step.release(site, layer)

        step.backward(consume)
    gc.collect()
    assert len(grads) == model.n_layers * len(SITES)
    assert all(ref() is None for ref in grads + diffs)
    assert hooks and not step.tape._hooks
    assert all(not handle.hooks_dict_ref() for handle in hooks)  # removed from their tensors


def test_a_path_of_one_point_at_the_base_input_equals_atp():
    """Points((1.0,)) differentiates at a second forward from the base embeddings: AtP's numbers, 3 forwards."""
    model = load(build_hf("llama", seed=4))
    pairs = make_pairs(n_pairs=3)
    got = {}
    for points in (AT_BASE, Points((1.0,))):
        cost, estimates = Cost(), {}
        with gradient_step(
            model, pairs, torch.arange(3), direction="noising", sites=[], diff_sites=SITES, grad_sites=SITES,
            cost=cost, points=points,
        ) as step:  # fmt: skip

            def consume(layer: int, site: str, grad: torch.Tensor) -> None:
                for t in ALL:
                    if NODE_TABLE[t].site == site:
                        estimates[(t, layer)] = atp_estimate(step, t, layer, grad)

            step.backward(summed_over_points(step, consume))
        got[points] = (estimates, cost)
    (atp, atp_cost), (one, one_cost) = got[AT_BASE], got[Points((1.0,))]
    assert atp.keys() == one.keys() and (atp_cost.forward, one_cost.forward) == (6.0, 9.0)
    assert atp_cost.backward == one_cost.backward == 3.0
    for key, value in atp.items():
        assert_rel_close(one[key], value, 1e-10, str(key))  # e(source) + 1·(e(base) - e(source)) rounds


def test_path_sums_gradients_over_its_points_and_averages_the_product():
    """path(m): the consumer gets Σ_k ∂L/∂n(x_k) once, at the last point; the product divides by m."""
    model = load(build_hf("gpt2", n_layers=2, seed=7))
    pairs = make_pairs()
    points, calls = path(3), []
    with gradient_step(
        model, pairs, torch.arange(2), direction="noising", sites=[], diff_sites=["z"], grad_sites=["z"],
        cost=Cost(), points=points,
    ) as step:  # fmt: skip
        step.backward(summed_over_points(step, lambda layer, site, grad: calls.append((step.point, layer))))
        assert step.point == 2 and step.last_point
    assert sorted(calls) == [(2, 0), (2, 1)]
    assert points.fractions == (0.0, 1 / 3, 2 / 3) and points.mean(torch.tensor(3.0)) == 1.0


def test_graddrop_on_a_path_is_refused():
    model = load(build_hf("gpt2", n_layers=2, seed=7))
    with pytest.raises(InputError, match="GradDrop drops layers from the base run's backward"):
        with gradient_step(
            model, make_pairs(), torch.arange(2), direction="noising", sites=[], diff_sites=["z"], grad_sites=["z"],
            cost=Cost(), grad_drop=True, points=path(2),
        ):  # fmt: skip
            pass


def test_tape_hands_out_what_autograd_grad_returns_and_zeros_where_unreached():
    """A tape on a toy two-layer chain: each watched gradient equals torch.autograd.grad's, bit for bit;
    a watched tensor the metric does not depend on gets zeros; GradDrop's seed skips layer 1's write."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    w0, w1 = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    site0 = hidden @ w0  # layer 0's site
    resid1 = hidden + torch.tanh(site0)
    site1 = resid1 @ w1  # layer 1's site
    unused = resid1 * 2  # watched, but the metric does not read it
    final = resid1 + torch.tanh(site1)
    metric = (final**2).sum(-1)  # [2]
    want = torch.autograd.grad(metric.sum(), [site0, site1, final], retain_graph=True)
    (seed,) = torch.autograd.grad(metric.sum(), final, retain_graph=True)  # ∂L/∂resid_2: layer 1's write held
    want_dropped = torch.autograd.grad(resid1, [site0], grad_outputs=seed, retain_graph=True)
    cost = Cost()
    tape = Tape(2, cost, grad_drop=True)
    tape.hidden, tape.resid = hidden, [hidden, resid1, final]
    for layer, site, x in ((0, "s", site0), (1, "s", site1), (1, "unused", unused), (2, "final", final)):
        tape.watch(layer, site, x)
    got: dict[tuple[int, str], torch.Tensor] = {}
    tape.backward(metric, lambda layer, site, grad: got.__setitem__((layer, site), grad))
    assert torch.equal(got[(0, "s")], want[0]) and torch.equal(got[(1, "s")], want[1])
    assert torch.equal(got[(2, "final")], want[2]) and torch.equal(got[(1, "unused")], torch.zeros(2, 3))
    got.clear()
    assert list(tape.dropped(lambda layer, site, grad: got.__setitem__((layer, site), grad))) == [1]
    assert list(got) == [(0, "s")] and torch.equal(got[(0, "s")], want_dropped[0])
    assert (cost.backward, len(tape._hooks)) == (2 + 2 * 1 / 2, 4)
    tape.close()
    assert not tape._hooks
