"""City -> country pairs: structure, filtering rule, errors, and SmolLM2's recall."""

from __future__ import annotations

import importlib

import pytest
import torch
from tasks_helpers import clean_metric, word_tokenizer

from atpstar.errors import InputError
from atpstar.tasks import cities
from atpstar.tasks.cities import CITY_COUNTRY, TEMPLATE, usable_facts


@pytest.fixture(scope="module")
def tokenizer():
    texts = [TEMPLATE.format(city=city) + " " + country for city, country in CITY_COUNTRY]
    return word_tokenizer(texts)


def test_pairs_match_the_facts(tokenizer):
    pairs = cities(tokenizer, 30, seed=2)
    assert pairs.clean.shape == pairs.noise.shape == (30, 8)
    country_of = {city: country for city, country in CITY_COUNTRY}
    for clean, noise, answer, distractor in zip(pairs.clean, pairs.noise, pairs.answer, pairs.distractor):
        city, other = tokenizer.decode(clean[:1]), tokenizer.decode(noise[:1])
        assert tokenizer.decode(answer) == " " + country_of[city]
        assert tokenizer.decode(distractor) == " " + country_of[other]
        assert answer != distractor
        assert torch.equal(clean[1:], noise[1:])


def test_deterministic_per_seed(tokenizer):
    assert torch.equal(cities(tokenizer, 10, seed=1).clean, cities(tokenizer, 10, seed=1).clean)
    assert not torch.equal(cities(tokenizer, 10, seed=1).clean, cities(tokenizer, 10, seed=2).clean)


def test_keeps_most_common_prompt_length(monkeypatch):
    # "New York" makes a longer prompt than the one-word cities, so the rule drops it.
    facts = [("Paris", "France"), ("Rome", "Italy"), ("New York", "America")]
    tokenizer = word_tokenizer([TEMPLATE.format(city=c) + " " + k for c, k in facts])
    # The package exports the function ``cities``, which shadows the submodule as an attribute.
    module = importlib.import_module("atpstar.tasks.cities")
    monkeypatch.setattr(module, "CITY_COUNTRY", tuple(facts))
    assert usable_facts(tokenizer) == facts[:2]


def test_tokenizer_without_countries(toy):
    with pytest.raises(InputError, match="countries"):
        cities(toy.tokenizer, 4)


def test_bad_count(tokenizer):
    with pytest.raises(InputError, match="n must be"):
        cities(tokenizer, 0)


@pytest.mark.slow
def test_smollm2_recalls_countries(smollm2):
    diff = clean_metric(smollm2, cities(smollm2.tokenizer, 64, seed=0))
    assert diff.mean() > 2.0
    assert (diff > 0).float().mean() > 0.7
