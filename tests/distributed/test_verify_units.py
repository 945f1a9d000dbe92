"""Verification windows: a sweep resumed with another worker count keeps the windows it started with."""

from __future__ import annotations

import pytest
import torch

from atpstar.cost import Cost
from atpstar.distributed import verify_units
from atpstar.distributed.executor import LocalExecutor
from reference.models import build_hf, load, make_pairs

NODES = ["head", "value"]


class Interrupted(Exception):
    pass


def _ranked(n: int) -> tuple[torch.Tensor, ...]:
    """The first ``n`` (type, layer, unit, pos) tuples of heads and values of a 2-layer, 4-head, 5-token model."""
    grid = torch.cartesian_prod(torch.arange(2), torch.arange(2), torch.arange(4), torch.arange(5))[:n]  # [n, 4]
    return tuple(grid.unbind(1))


def _executor(model, workers: int, stop_after: int | None = None) -> LocalExecutor:
    """A local executor that plans like ``workers`` workers and, optionally, stops after some units."""
    executor = LocalExecutor(model, progress=False)
    executor.workers = workers
    if stop_after is not None:
        run, calls = executor.state.run, []

        def limited(sweep, unit):
            if len(calls) == stop_after:
                raise Interrupted
            calls.append(unit)
            return run(sweep, unit)

        executor.state.run = limited
    return executor


def test_windows_do_not_depend_on_the_worker_count_after_a_resume(tmp_path):
    model, pairs = load(build_hf("gpt_neox", n_layers=2)), make_pairs(n_pairs=2, seq_len=5)
    ranked = _ranked(70)
    args = (model, pairs, NODES, "noising", ranked, 16)
    expected, expected_base, _ = verify_units.verify_on(_executor(model, 0), *args, None, Cost())
    folder = tmp_path / "verify"
    with pytest.raises(Interrupted):  # started with 5 workers: 20 windows of 4 ranks
        verify_units.verify_on(_executor(model, 5, stop_after=3), *args, str(folder), Cost())
    assert len(list(folder.glob("*.safetensors"))) == 3
    effects, base, info = verify_units.verify_on(_executor(model, 0), *args, str(folder), Cost())
    assert info["units_resumed"] == 3 and info["units"] == 18  # the folder's windows, not 8 of 9 ranks
    # Windows of another size batch other forwards together: equal up to float64 rounding.
    torch.testing.assert_close(effects, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(base, expected_base)


def test_rank_window_follows_the_target_and_its_cap():
    assert verify_units.rank_window(70, 20) == 4 and verify_units.rank_window(70, 8) == 9
    assert verify_units.rank_window(10**6, 8) == verify_units.MAX_WINDOW
