"""``attribute`` with workers on prompt pairs of several lengths (a ``PairSet``): the same numbers as in-process.

Methods whose pairs do not interact run as whole calls on blocks of pairs (a block may hold several
lengths; the worker runs its groups). Methods with work units of their own (exact patching) run site
nodes only on workers, and those have a position axis, refused on several lengths. The executor here
is the in-process one behind the public ``workers=`` path (the Ray executor runs the same units:
``tests/distributed``).
"""

from __future__ import annotations

import pytest
import torch

import atpstar
from atpstar.distributed import LocalExecutor
from atpstar.edges.circuits import SIGN
from atpstar.errors import InputError
from atpstar.methods.base import Method
from reference.models import VOCAB, assert_rel_close, build_hf, load

REL = 1e-12  # float64: the block a pair is batched with changes only rounding
LENGTHS = (5, 7, 5, 6, 7)


class TwoWorkers(LocalExecutor):
    workers = 2  # plans units as for two workers; runs them here


@pytest.fixture(scope="module")
def setting():
    model = load(build_hf("gpt2", n_layers=2, seed=5))
    gen = torch.Generator().manual_seed(6)
    clean = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in LENGTHS]
    noise = [[*c[:-3], int(torch.randint(0, VOCAB, (1,), generator=gen)), *c[-2:]] for c in clean]
    answer = torch.randint(0, VOCAB // 2, (len(LENGTHS),), generator=gen).tolist()
    distractor = [a + VOCAB // 2 for a in answer]
    return model, atpstar.PairSet.from_ids(clean, noise, answer, distractor)


@pytest.fixture
def workers(monkeypatch):
    """``workers=2`` runs on the in-process executor (the public path down to the units)."""

    def executor(self, model, workers, address, progress):
        return None if workers is None and address is None else TwoWorkers(model, progress)

    monkeypatch.setattr(Method, "_executor", executor)


@pytest.mark.parametrize("method", ["atp*", "atp+ig", "atp+qkfix"])
def test_workers_on_several_lengths_give_the_in_process_result(setting, workers, method):
    model, pairs = setting
    assert len(pairs.groups) == 3
    expected = atpstar.attribute(model, pairs, method, nodes=["edge"])
    result = atpstar.attribute(model, pairs, method, nodes=["edge"], workers=2)
    assert_rel_close(result.per_pair["edge"], expected.per_pair["edge"], REL, method)
    assert_rel_close(result.scores["edge"], expected.scores["edge"], REL, method)
    assert result.info["identity"] == expected.info["identity"]
    assert result.n_pairs == pairs.n_pairs
    assert result.cost.forward == pytest.approx(expected.cost.forward)
    assert result.cost.backward == pytest.approx(expected.cost.backward)
    assert result.info["units"] > 1  # blocks of pairs, some of several lengths
    if method == "atp*":
        clear = expected.per_pair["edge"] > 1e-10
        assert torch.equal(result.extras[SIGN][clear], expected.extras[SIGN][clear])


def test_verify_with_workers_on_several_lengths_says_what_to_do(setting):
    model, pairs = setting
    estimate = atpstar.attribute(model, pairs, "atp", nodes=["edge"])
    with pytest.raises(InputError, match="run each group"):
        atpstar.verify(model, pairs, estimate, budget=2, workers=2)


def test_exact_patching_checkpoint_on_several_lengths_resumes_per_length(setting, tmp_path):
    model, pairs = setting
    expected = atpstar.attribute(model, pairs, "activation_patching", nodes=["edge"])
    first = atpstar.attribute(model, pairs, "activation_patching", nodes=["edge"], checkpoint=str(tmp_path))
    again = atpstar.attribute(model, pairs, "activation_patching", nodes=["edge"], checkpoint=str(tmp_path))
    for result in (first, again):
        assert torch.equal(result.per_pair["edge"], expected.per_pair["edge"])
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert folders == [f"length-{n}" for n in sorted(set(LENGTHS))]
    assert again.info["edge_resumed_from"] == {"per_group": [str(tmp_path / f / "edges") for f in folders]}
