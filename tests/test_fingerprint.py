"""Identity fingerprints tell apart everything that changes a result, and name what differs."""

from __future__ import annotations

import copy

import pytest
import torch

from atpstar.errors import IdentityMismatchError
from atpstar.fingerprint import RESULT_FIELDS, check_identity, identity, weights_hash
from reference.models import build_hf, load, make_pairs


def test_identity_fields_and_mismatch_message() -> None:
    hf = build_hf("llama")
    model = load(hf)
    pairs = make_pairs()
    base = identity(model, pairs, "noising", ["head"], "atp", {"batch_size": 2})
    assert identity(model, pairs, "noising", ["head"], "atp", {"batch_size": 8}) == base  # bookkeeping only
    other = copy.deepcopy(hf)
    with torch.no_grad():
        next(other.parameters())[0, 0] += 1e-3
    changed = identity(load(other), pairs, "denoising", ["head"], "atp", {})
    assert changed["weights"] != base["weights"]
    with pytest.raises(
        IdentityMismatchError, match=r"model weights \(saved .*direction \(saved 'noising', now 'denoising'\)"
    ):
        check_identity(base, changed, "saved result X", "Pass --recompute.", fields=RESULT_FIELDS)
    check_identity(base, dict(base), "x", "fix")
    as32 = identity(load(copy.deepcopy(hf).float()), pairs, "noising", ["head"], "atp", {"batch_size": 2})
    assert (
        as32["weights"] == base["weights"] and as32["dtype"] == "float32" != base["dtype"]
    )  # weights named, not their dtype
    other_pairs = make_pairs()
    other_pairs.clean[0, 0] = (other_pairs.clean[0, 0] + 1) % 10
    assert identity(model, other_pairs, "noising")["pairs"] != base["pairs"]


def test_weights_hash_cached_per_model() -> None:
    hf = build_hf("gpt2")
    first = weights_hash(hf)
    with torch.no_grad():
        next(hf.parameters()).add_(1.0)
    assert weights_hash(hf) == first  # computed once per loaded model


def test_api_refuses_results_of_another_model_or_pairs() -> None:
    import atpstar
    from atpstar.errors import InputError

    hf = build_hf("gpt2")
    other = copy.deepcopy(hf)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    model_a, model_b = load(hf), load(other)
    pairs = make_pairs(n_pairs=2, seq_len=5)
    estimate = atpstar.attribute(model_a, pairs, "atp", ["head"])
    with pytest.raises(IdentityMismatchError, match=r"model weights \(saved"):
        atpstar.verify(model_b, pairs, estimate, budget=2)
    other_pairs = make_pairs(n_pairs=2, seq_len=5, seed=3)
    with pytest.raises(IdentityMismatchError, match=r"prompt pairs"):
        atpstar.verify(model_a, other_pairs, estimate, budget=2)
    truth_b = atpstar.attribute(model_b, pairs, "activation_patching", ["head"])
    with pytest.raises(IdentityMismatchError, match="model weights"):
        atpstar.evaluate(truth_b, [estimate])
    verified = atpstar.verify(model_a, pairs, estimate, budget=2)
    with pytest.raises(IdentityMismatchError, match="model weights"):
        atpstar.false_negative_bound(model_b, pairs, verified, samples=4)
    with pytest.raises(InputError, match="theta"):
        atpstar.false_negative_bound(model_a, pairs, verified, theta=float("nan"), samples=4)
