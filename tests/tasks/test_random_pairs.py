"""Random pairs sampled from the model: shapes, determinism, sampling rule and errors."""

from __future__ import annotations

import pytest
import torch
from tasks_helpers import clean_metric

from atpstar.errors import InputError
from atpstar.tasks import random_pairs


def test_shapes_and_metric(toy):
    pairs = random_pairs(toy, 6, 10, seed=0)
    assert pairs.clean.shape == pairs.noise.shape == (6, 10)
    assert pairs.answer.shape == (6,) and pairs.distractor is None
    assert pairs.metric == "logprob"
    bos = toy.tokenizer.bos_token_id
    assert (pairs.clean[:, 0] == bos).all() and (pairs.noise[:, 0] == bos).all()
    special = torch.tensor(toy.tokenizer.all_special_ids)
    assert not torch.isin(pairs.clean[:, 1:], special).any() and not torch.isin(pairs.answer, special).any()
    assert not torch.equal(pairs.clean, pairs.noise)


def test_deterministic_per_seed(toy):
    first, again, other = (random_pairs(toy, 4, 8, seed=s) for s in (1, 1, 2))
    assert torch.equal(first.clean, again.clean) and torch.equal(first.answer, again.answer)
    assert not torch.equal(first.clean, other.clean)


def test_answer_is_likely(toy):
    # The answer is sampled from the model, so its log-probability is finite and usually not tiny.
    logprob = clean_metric(toy, random_pairs(toy, 16, 12, seed=0))
    assert torch.isfinite(logprob).all() and logprob.mean() > -5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0, "seq_len": 5}, "n must be"),
        ({"n": 2, "seq_len": 1}, "seq_len must be"),
        ({"n": 2, "seq_len": 5, "temperature": 0}, "temperature"),
    ],
)
def test_bad_input(toy, kwargs, message):
    with pytest.raises(InputError, match=message):
        random_pairs(toy, **kwargs)


def test_needs_wrapped_model_with_tokenizer(toy):
    from atpstar.model import Model

    with pytest.raises(InputError, match="atpstar.Model"):
        random_pairs(toy.hf_model, 2, 5)
    with pytest.raises(InputError, match="tokenizer"):
        random_pairs(Model(toy.hf_model), 2, 5)


@pytest.mark.slow
def test_smollm2_samples(smollm2):
    pairs = random_pairs(smollm2, 4, 12, seed=0)
    assert pairs.clean.shape == (4, 12)
    assert torch.isfinite(clean_metric(smollm2, pairs)).all()
