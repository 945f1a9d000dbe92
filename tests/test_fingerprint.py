"""Identity fingerprints tell apart everything that changes a result, and name what differs."""

from __future__ import annotations

import copy

import pytest
import torch
from reference.models import build_hf, load, make_pairs

from atpstar.errors import IdentityMismatchError
from atpstar.fingerprint import RESULT_FIELDS, check_identity, identity, weights_hash


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
