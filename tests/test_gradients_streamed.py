"""gradients: GradDrop's passes layer by layer (``GradientStep.streamed``) against ``backward`` + ``dropped``,
and differences kept in rows the caller gives (``diff_into``)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from atpstar.cost import Cost
from atpstar.gradients import gradient_step
from atpstar.nodes import NODE_TABLE
from reference.models import build_hf, load, make_pairs

ALL = ["neuron", "query", "key", "value", "head"]
SITES = [NODE_TABLE[t].site for t in ALL]


def _step(model, pairs, cost, **options):
    return gradient_step(
        model, pairs, torch.arange(2), direction="noising", sites=["q", "k"], diff_sites=SITES, grad_sites=SITES,
        cost=cost, grad_drop=True, **options,
    )  # fmt: skip


def _arrivals_in_two_calls(model, pairs):
    """(layer, site) -> the gradients in the order ``backward`` then ``dropped`` hand them out."""
    got: dict[tuple[int, str], list[torch.Tensor]] = {}
    cost = Cost()

    def keep(layer: int, site: str, grad: torch.Tensor) -> None:
        got.setdefault((layer, site), []).append(grad.clone())

    with _step(model, pairs, cost) as step:
        step.backward(keep)
        for _ in step.dropped(keep):
            pass
    return got, cost


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_streamed_hands_out_the_same_gradients_in_the_same_order_layer_by_layer(family):
    model = load(build_hf(family, n_layers=4, seed=7))
    pairs = make_pairs()
    expected, expected_cost = _arrivals_in_two_calls(model, pairs)
    got: dict[tuple[int, str], list[torch.Tensor]] = {}
    kinds: dict[tuple[int, str], list[str]] = {}
    finished: list[int] = []

    def keep(kind: str):
        def consume(layer: int, site: str, grad: torch.Tensor) -> None:
            assert layer not in finished, f"a gradient of layer {layer} after its turn"
            assert not finished or layer == finished[-1] - 1, "layers come one at a time from the top"
            got.setdefault((layer, site), []).append(grad.clone())
            kinds.setdefault((layer, site), []).append(kind)

        return consume

    cost = Cost()
    with _step(model, pairs, cost) as step:
        step.streamed(keep("full"), keep("dropped"), finished.append)
        assert step.base.records["resid_pre"][1:] == [None] * model.n_layers  # dropped after each turn
    assert finished == list(range(model.n_layers - 1, -1, -1))
    assert got.keys() == expected.keys()
    for key, grads in expected.items():
        layer = key[0]
        assert kinds[key] == ["full"] + ["dropped"] * (model.n_layers - 1 - layer)
        assert len(got[key]) == len(grads)
        for i, (a, b) in enumerate(zip(got[key], grads)):
            assert torch.equal(a, b), f"{family} {key} pass {i}: max diff {(a - b).abs().max():.3g}"
    assert (cost.forward, cost.backward) == (expected_cost.forward, expected_cost.backward)


def test_a_layer_graph_is_freed_after_its_turn():
    """After done(j) the base run's tensors of layer j (here the recorded query) are gone: nothing keeps them."""
    model = load(build_hf("llama", n_layers=3, seed=8))
    pairs = make_pairs()
    refs: dict[int, weakref.ref[torch.Tensor]] = {}
    alive_after: dict[int, bool] = {}

    with _step(model, pairs, Cost()) as step:
        for layer in range(model.n_layers):
            refs[layer] = weakref.ref(step.base.get("q", layer))

        def done(layer: int) -> None:
            for site in ("q", "k", *SITES):
                step.release(site, layer)
            gc.collect()
            alive_after[layer] = refs[layer]() is not None

        step.streamed(lambda *_: None, lambda *_: None, done)
    assert alive_after == {2: False, 1: False, 0: False}


def test_differences_go_into_the_given_rows_where_shapes_match():
    model = load(build_hf("gpt_neox", n_layers=2, seed=9))
    pairs = make_pairs()
    n_pos, d_mlp = pairs.seq_len, model.sizes.d_mlp
    rows = {"neuron": torch.full((2, model.n_layers, n_pos, d_mlp), torch.nan, dtype=torch.float64),
            "z": torch.zeros(2, model.n_layers, model.n_heads, n_pos)}  # fmt: skip
    with _step(model, pairs, Cost()) as plain:
        expected = {key: diff.clone() for key, diff in plain.diffs.items()}
    with _step(model, pairs, Cost(), diff_into=rows) as step:
        for (layer, site), diff in step.diffs.items():
            assert torch.equal(diff, expected[(layer, site)])
            shared = diff.untyped_storage().data_ptr() == rows["neuron"].untyped_storage().data_ptr()
            assert shared == (site == "neuron"), (layer, site)  # z's rows have another shape: a tensor of its own
        assert torch.equal(rows["neuron"][:, 1], expected[(1, "neuron")])
    assert not rows["z"].any()
