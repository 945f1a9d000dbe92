"""pairs: PromptPairs validation, metrics and from_text."""

from __future__ import annotations

import pytest
import torch

import atpstar
from atpstar.pairs import logit_diff, logprob

WORDS = ["Mary", "John", "went", "to", "the", "store", "gave", "a", "drink", "park", "[UNK]"]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_valid_pairs():
    pairs = atpstar.PromptPairs(clean=[[1, 2, 3], [4, 5, 6]], noise=[[1, 7, 3], [4, 5, 0]], answer=[1, 2], distractor=[3, 4])
    assert (pairs.n_pairs, pairs.seq_len, pairs.metric_name) == (2, 3, "logit_diff")
    base, source = pairs.base_and_source("denoising")
    assert torch.equal(base, pairs.noise) and torch.equal(source, pairs.clean)
    sub = pairs.subset([1])
    assert torch.equal(sub.clean, pairs.clean[1:]) and torch.equal(sub.distractor, pairs.distractor[1:])
    assert pairs.fingerprint() != sub.fingerprint()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(clean=[[1, 2, 3]], noise=[[1, 2]], answer=[1], distractor=[2]), "same shape"),
        (dict(clean=[[1, 2]], noise=[[1, 2]], answer=[1, 2], distractor=[2, 3]), "one token per pair"),
        (dict(clean=[[1.0, 2.0]], noise=[[1, 2]], answer=[1], distractor=[2]), "integer"),
        (dict(clean=[1, 2], noise=[1, 2], answer=[1], distractor=[2]), "shape"),
        (dict(clean=[[1, 2]], noise=[[1, 2]], answer=[1]), "distractor"),
        (dict(clean=[[1, 2]], noise=[[1, 2]], answer=[1], distractor=[2], metric="accuracy"), "unknown metric"),
        (dict(clean=[[1, 2]], noise=[[1, 2]], answer=[1], distractor=[2], metric=3), "callable"),
        (dict(clean=torch.zeros(0, 3, dtype=torch.long), noise=torch.zeros(0, 3, dtype=torch.long), answer=[], distractor=[]), "empty"),
    ],
)
def test_invalid_pairs(kwargs, match):
    with pytest.raises(atpstar.InputError, match=match):
        atpstar.PromptPairs(**kwargs)


def test_logprob_without_distractor_is_fine():
    pairs = atpstar.PromptPairs(clean=[[1, 2]], noise=[[1, 3]], answer=[1], metric="logprob")
    assert pairs.distractor is None


def test_builtin_metrics():
    logits = torch.randn(3, 7, dtype=torch.float64)
    answer, distractor = torch.tensor([0, 3, 6]), torch.tensor([1, 2, 0])
    rows = torch.arange(3)
    assert torch.equal(logit_diff(logits, answer, distractor), logits[rows, answer] - logits[rows, distractor])
    expected = logits[rows, answer] - logits.exp().sum(-1).log()
    assert torch.allclose(logprob(logits, answer, None), expected, rtol=0, atol=1e-14)


def test_from_text(tokenizer):
    pairs = atpstar.PromptPairs.from_text(
        tokenizer, clean=["Mary went to the store", "John went to the park"],
        noise=["John went to the store", "Mary went to the park"], answer=["John", "Mary"], distractor=["Mary", "John"],
    )
    assert pairs.clean.tolist()[0] == [0, 2, 3, 4, 5]
    assert pairs.answer.tolist() == [1, 0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(clean=["Mary went to the store"], noise=["John went to store"], answer=["John"], distractor=["Mary"]), "pair 0"),
        (dict(clean=["Mary went", "Mary went to"], noise=["John went", "John went to"], answer=["John", "John"],
              distractor=["Mary", "Mary"]), "same length"),
        (dict(clean=["Mary went"], noise=["John went"], answer=["John Mary"], distractor=["Mary"]), "exactly one token"),
        (dict(clean=["Mary went"], noise=["John went"], answer=["John", "Mary"], distractor=["Mary"]), "same number"),
    ],
)
def test_from_text_errors(tokenizer, kwargs, match):
    with pytest.raises(atpstar.InputError, match=match):
        atpstar.PromptPairs.from_text(tokenizer, **kwargs)


def test_token_ids_out_of_vocabulary_refused(hf_models):
    from reference.models import VOCAB, load

    pairs = atpstar.PromptPairs(clean=[[1, VOCAB]], noise=[[1, 2]], answer=[1], distractor=[2])
    with pytest.raises(atpstar.InputError, match="token ids"):
        atpstar.attribute(load(hf_models["gpt2"]), pairs, method="atp", nodes=["head"])
