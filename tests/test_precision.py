"""Half-precision models: passes run in bfloat16, estimates and metrics are accumulated in float32."""

from __future__ import annotations

import pytest
import torch

import atpstar
from reference.models import build_hf, load, make_pairs

# Gradient estimates: one bf16 forward/backward, products and sums in float32 (~1% error). Exact effects are
# differences of two bf16 forwards, so their noise is bf16's relative to the logits, not to the effect.
TOLERANCE = {"atp": 0.05, "atp*": 0.05, "activation_patching": 0.3}


@pytest.mark.parametrize("method_id", sorted(TOLERANCE))
def test_bfloat16_results_are_float32_and_close_to_float32_runs(method_id):
    hf = build_hf("llama", n_layers=2, seed=41, dtype=torch.float32, saturated=False)
    pairs = make_pairs(n_pairs=2, seq_len=4, seed=42)
    want = atpstar.attribute(load(hf), pairs, method=method_id, nodes=["neuron", "value"])
    got = atpstar.attribute(load(hf.to(torch.bfloat16)), pairs, method=method_id, nodes=["neuron", "value"])
    for t in want.per_pair:
        assert got.per_pair[t].dtype == torch.float32 and got.scores[t].dtype == torch.float32
        error = (got.per_pair[t] - want.per_pair[t]).norm() / want.per_pair[t].norm()
        assert error < TOLERANCE[method_id], (t, float(error))
