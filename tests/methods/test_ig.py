"""Node-level ``atp+ig`` against brute-force integrated gradients (``reference.ig``: module hooks on the
transformers model, interpolated layer-0 inputs, autograd), float64, three families."""

from __future__ import annotations

import pytest

import atpstar
from reference import hooks
from reference.ig import integrated_gradients
from reference.models import assert_rel_close, load, make_pairs

ALL = ["neuron", "query", "key", "value", "head"]


@pytest.mark.parametrize(("steps", "direction"), [(1, "noising"), (3, "noising"), (2, "denoising")])
def test_atp_ig_matches_brute_force_integrated_gradients(hf_model, family, steps, direction):
    pairs = make_pairs()
    expected = integrated_gradients(hooks.reference_copy(hf_model), pairs, steps, direction)
    result = atpstar.attribute(load(hf_model), pairs, method="atp+ig", nodes=ALL, ig_steps=steps, direction=direction)
    for t in ALL:
        assert float(expected[t].abs().max()) > 1e-3, t
        assert_rel_close(result.per_pair[t], expected[t], 1e-8, f"{family} IG({steps}) {direction} {t}")
    assert result.cost.forward == (2 + steps) * pairs.n_pairs and result.cost.backward == steps * pairs.n_pairs


def test_one_step_is_atp_at_the_source_run(hf_model, family):
    # m = 1 uses the gradient at the source prompt only: AtP's product with the source run's gradient,
    # which differs from plain AtP (gradient at the base run) -- the reference must tell them apart.
    pairs = make_pairs()
    ig = atpstar.attribute(load(hf_model), pairs, method="atp+ig", nodes=["head"], ig_steps=1)
    atp = atpstar.attribute(load(hf_model), pairs, method="atp", nodes=["head"])
    assert not ig.per_pair["head"].allclose(atp.per_pair["head"], rtol=1e-3)
