"""Shared input checks: each refuses NaN, inf, wrong types and out-of-range values with a clear message."""

from __future__ import annotations

import math

import pytest
import torch

from atpstar.errors import InputError
from atpstar.validate import (
    GIB,
    batch_for_memory,
    check_count,
    check_finite_metric,
    check_length,
    check_memory,
    check_memory_gb,
    check_number,
    check_single_token,
    check_token_ids,
)


def test_counts() -> None:
    assert check_count("n", 3) == 3 and check_count("n", 4.0) == 4 and check_count("n", 0, minimum=0) == 0
    for bad in (0, -5, 2.5, math.nan, math.inf, True, "3", None):
        with pytest.raises(InputError, match="n must be an integer"):
            check_count("n", bad)
    with pytest.raises(InputError, match=r"in \[1, 3\]"):
        check_count("n", 4, maximum=3)


def test_numbers() -> None:
    assert check_number("p", 0.5, 0, 1, low_open=True, high_open=True) == 0.5
    for bad in (math.nan, math.inf, -math.inf, "x", None, True):
        with pytest.raises(InputError, match="p must be"):
            check_number("p", bad, 0, 1)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(InputError, match=r"\(0, 1\)"):
            check_number("p", bad, 0, 1, low_open=True, high_open=True)
    for bad in (0, -1, math.nan):
        with pytest.raises(InputError, match="memory_gb"):
            check_memory_gb(bad)


def test_batch_rule_and_memory() -> None:
    assert batch_for_memory(7, 1.0, 1000) == 7
    assert batch_for_memory(None, 1.0, 2**20) == 1024
    assert batch_for_memory(None, 0.5, 2**20) == 512
    assert batch_for_memory(None, 1e-9, 2**20) == 1
    check_memory(GIB, "a tiny request", "fix")
    with pytest.raises(InputError, match="needs about .* GiB, more than"):
        check_memory(1e6 * GIB, "--n-pairs 1000000000", "use fewer pairs")


class _Words:
    unk_token_id = 0
    unk_token = "<unk>"
    vocab = {"<unk>": 0, " Mary": 1, " John": 2, " went": 3}

    def encode(self, text, add_special_tokens=False):
        return [self.vocab.get(" " + w, 0) for w in text.split()]


def test_tokens_and_lengths() -> None:
    tok = _Words()
    assert check_single_token(tok, " Mary", "answer") == 1
    with pytest.raises(InputError, match="2 tokens"):
        check_single_token(tok, " Mary John", "answer")
    with pytest.raises(InputError, match=r"outside the tokenizer's vocabulary \(unknown: \['Zed'\]\)"):
        check_single_token(tok, " Zed", "answer", "f.jsonl:3: ")
    with pytest.raises(InputError, match=r"\[0, 10\).*\[12, -1\]"):
        check_token_ids("answer", torch.tensor([1, 12, -1]), 10)
    check_token_ids("answer", torch.tensor([0, 9]), 10)
    check_length(32, 32)
    with pytest.raises(InputError, match="at most 32 positions"):
        check_length(33, 32)


def test_finite_metric() -> None:
    check_finite_metric(torch.tensor([1.0, -2.0]), "metric")
    with pytest.raises(InputError, match=r"not finite .* pair\(s\) \[3\]"):
        check_finite_metric(torch.tensor([1.0, math.nan]), "metric", torch.tensor([0, 3]))
    with pytest.raises(InputError, match="not finite"):
        check_finite_metric(torch.tensor([math.inf]), "metric")


@pytest.mark.parametrize("method", ["atp", "atp*", "atp+ig", "subsampling", "blocks", "hierarchical"])
@pytest.mark.parametrize(("option", "value"), [("memory_gb", math.nan), ("memory_gb", -1.0), ("batch_size", 2.5),
                                                ("batch_size", 0), ("batch_size", True)])
def test_every_method_checks_batching_with_the_shared_rule(method, option, value) -> None:
    """One rule for batch_size/memory_gb in every method (NaN budgets used to slip through the API)."""
    import atpstar
    from reference.models import build_hf, load, make_pairs

    model, pairs = load(build_hf("gpt2", n_layers=2)), make_pairs(n_pairs=1, seq_len=4)
    with pytest.raises(InputError, match=option):
        atpstar.attribute(model, pairs, method, nodes=["head"], **{option: value})


def test_whole_float_batch_size_is_stored_as_int() -> None:
    import atpstar
    from reference.models import build_hf, load, make_pairs

    model, pairs = load(build_hf("gpt2", n_layers=2)), make_pairs(n_pairs=2, seq_len=4)
    a = atpstar.attribute(model, pairs, "blocks", nodes=["head"], batch_size=4.0)
    b = atpstar.attribute(model, pairs, "blocks", nodes=["head"], batch_size=4)
    assert torch.equal(a.scores["head"], b.scores["head"])


def test_warn_non_finite_counts_exactly_also_when_the_fast_sum_overflows():
    import warnings

    from atpstar.validate import warn_non_finite

    big = torch.full((4,), 3e38, dtype=torch.float32)  # finite values whose sum overflows to inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_non_finite({"neuron": big, "head": torch.zeros(3)}, "x") == 0
    bad = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    with pytest.warns(UserWarning, match="3 NaN or infinite"):
        assert warn_non_finite({"neuron": bad, "head": big}, "x") == 3
