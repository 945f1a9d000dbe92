"""pairsets: PairSet grouping, example order, answer positions, first-token answers, merging and refusals."""

from __future__ import annotations

import pytest
import torch

import atpstar
from atpstar.pairsets import PairSet, as_pairs, check_positions, merge_info
from reference.models import build_hf, load

CLEAN = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12, 13], [14, 15, 16, 17]]
NOISE = [[1, 20, 3, 4, 5], [6, 21, 8], [9, 22, 11, 12, 13], [14, 23, 16, 17]]
ANSWER, DISTRACTOR = [30, 31, 32, 33], [40, 41, 42, 43]


@pytest.fixture
def pairset() -> PairSet:
    return PairSet.from_ids(CLEAN, NOISE, ANSWER, DISTRACTOR)


def test_groups_by_length_and_keeps_the_example_order(pairset):
    assert [g.seq_len for g in pairset.groups] == [3, 4, 5]
    assert pairset.n_pairs == 4 and pairset.seq_len == 5
    assert pairset.lengths.tolist() == [5, 3, 5, 4] and pairset.answer_positions.tolist() == [4, 2, 4, 3]
    assert pairset.answer.tolist() == ANSWER and pairset.distractor.tolist() == DISTRACTOR
    per_group = [g.answer.double()[:, None].expand(-1, 2) for g in pairset.groups]  # [p, 2] per group
    assert pairset.gather(per_group).tolist() == [[a, a] for a in ANSWER]
    assert pairset.gather([p.T for p in per_group], dim=1).T.tolist() == [[a, a] for a in ANSWER]


def test_subset_fingerprint_and_single_length(pairset):
    sub = pairset.subset([2, 0])
    assert isinstance(sub, atpstar.PromptPairs) and not isinstance(sub, PairSet)
    assert sub.clean.tolist() == [CLEAN[2], CLEAN[0]]
    mixed = pairset.subset([3, 1])
    assert isinstance(mixed, PairSet) and mixed.answer.tolist() == [33, 31]
    assert (
        pairset.fingerprint()
        != PairSet.from_ids(CLEAN[::-1], NOISE[::-1], ANSWER[::-1], DISTRACTOR[::-1]).fingerprint()
    )
    same = PairSet.from_ids([CLEAN[0], CLEAN[2]], [NOISE[0], NOISE[2]], [30, 32], [40, 42])
    assert isinstance(as_pairs(same), atpstar.PromptPairs) and not isinstance(as_pairs(same), PairSet)


def test_answer_positions_cut_the_prompts():
    cut = PairSet.from_ids(CLEAN, NOISE, ANSWER, DISTRACTOR, answer_pos=[2, 2, 4, 1])
    assert cut.lengths.tolist() == [3, 3, 5, 2]
    assert cut.subset([0]).clean.tolist() == [CLEAN[0][:3]]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: PairSet.from_ids([[1, 2]], [[1, 2, 3]], [1], [2]), "same length"),
        (lambda: PairSet.from_ids([[1, 2]], [[1, 3]], [1], [2], answer_pos=[2]), "outside its prompt"),
        (lambda: PairSet.from_ids([], [], [], []), "same number"),
        (lambda: PairSet.from_ids([[1, 2]], [[1, 3]], [4], [4]), "same token"),
        (lambda: PairSet([]), "at least one group"),
        (lambda: PairSet.from_ids(CLEAN, NOISE, ANSWER, DISTRACTOR).clean, "several lengths"),
        (lambda: PairSet.from_ids(CLEAN, NOISE, ANSWER, DISTRACTOR).base_and_source("noising"), "several lengths"),
        (lambda: as_pairs([[1, 2]]), "PromptPairs or atpstar.PairSet"),
    ],
)
def test_bad_pair_sets_are_refused(call, match):
    with pytest.raises(atpstar.InputError, match=match):
        call()


def test_from_text_counts_answers_by_their_first_token():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<s>", "When", "Mary", "and", "John", "went", "to", "the", "store", "gave", "Ann", "Lee"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>")
    pairs = PairSet.from_text(
        tokenizer,
        ["When Mary and John went to the store John gave", "Mary gave"],
        ["When Mary and John went to the store Mary gave", "John gave"],
        [" Mary", " Ann Lee"],
        [" John", " Lee Ann"],
        prepend_bos=True,
    )
    assert pairs.answer.tolist() == [3, 11] and pairs.distractor.tolist() == [5, 12]
    assert pairs.lengths.tolist() == [11, 3] and pairs.subset([1]).clean[0, 0] == 1
    with pytest.raises(atpstar.InputError, match="no tokens"):
        PairSet.from_text(tokenizer, ["Mary gave"], ["John gave"], [""], [" John"])


def test_merge_info_and_check_positions(pairset):
    merged = merge_info(
        pairset, [{"a": 1, "n": 2, "l": [1.0]}, {"a": 1, "n": 1, "l": [2.0]}, {"a": 1, "n": 1, "l": [3.0, 4.0]}]
    )
    assert merged["a"] == 1 and merged["n"] == {"per_group": [2, 1, 1]}
    assert merged["l"] == pairset.gather([torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([3.0, 4.0])]).tolist()
    check_positions(pairset, {"edge": None})
    with pytest.raises(atpstar.InputError, match=r"\['head'\] have a position axis"):
        check_positions(pairset, {"edge": None, "head": 2})


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_a_single_length_pair_set_gives_the_rectangular_numbers(family):
    model = load(build_hf(family, n_layers=2, seed=5))
    pairs = atpstar.PromptPairs([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 9, 3, 4], [5, 10, 7, 8]], [11, 12], [13, 14])
    as_set = PairSet.from_ids(pairs.clean.tolist(), pairs.noise.tolist(), [11, 12], [13, 14])
    for method in ("atp*", "activation_patching"):
        a = atpstar.attribute(model, pairs, method=method, nodes=["head", "value"])
        b = atpstar.attribute(model, as_set, method=method, nodes=["head", "value"])
        assert all(torch.equal(a.per_pair[t], b.per_pair[t]) for t in a.per_pair)
        assert a.identity == b.identity and a.cost == b.cost


@pytest.mark.parametrize("method", sorted(atpstar.METHODS))
def test_every_method_refuses_positions_on_several_lengths_before_any_pass(method):
    model = load(build_hf("gpt2", n_layers=2, seed=5, n_positions=8))
    short = PairSet.from_ids([c[:4] for c in CLEAN], [n[:4] for n in NOISE], ANSWER, DISTRACTOR)  # lengths 3 and 4
    with pytest.raises(atpstar.InputError, match="position axis"):
        atpstar.attribute(model, short, method=method, nodes=["head"])
