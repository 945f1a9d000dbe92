"""The options of one ``atpstar.find`` call, checked once, before any forward pass (see ``find`` for each)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..pairs import check_direction
from ..validate import check_batch_size, check_count, check_memory_gb, check_number

SEED_MIN = -(2**63)  # torch generators take any 64-bit seed


@dataclass(frozen=True)
class FindOptions:
    """Checked options of ``atpstar.find`` (the arguments of the same name)."""

    theta: float  # the effect size sought, > 0
    alpha: float  # error rate of the certificate, in (0, 1)
    budget: float | None  # cap on the total cost in forward equivalents; None: no cap
    max_overspend: float  # bound rounds may risk this fraction of exhaustive patching beyond it, >= 0
    direction: str  # "noising" or "denoising"
    progress: bool
    patience: int | None  # window of the estimate-order stage; None: max(16, N / 200)
    max_rounds: int
    seed: int  # round r's bound uses seed + r
    estimator_options: dict[str, Any] | None
    batch_size: int | None
    memory_gb: float
    workers: int | None
    ray_address: str | None
    checkpoint: str | Path | None
    out_dir: str | Path | None
    recompute: bool

    @property
    def engine(self) -> dict[str, Any]:
        """Where verification and the bounds run (``workers`` / ``ray_address``; both None: in-process)."""
        return {"workers": self.workers, "ray_address": self.ray_address}

    @property
    def limit(self) -> float:
        """``budget``, or inf without one."""
        return math.inf if self.budget is None else self.budget

    def window(self, n_nodes: int) -> int:
        """Nodes per window of the estimate-order stage."""
        return self.patience or max(16, math.ceil(n_nodes / 200))

    def checkpoint_path(self, default_name: str) -> str | Path | None:
        """The journal file: ``checkpoint``, else ``out_dir/default_name`` when there is an ``out_dir``."""
        if self.out_dir is not None and self.checkpoint is None:
            return Path(self.out_dir) / default_name
        return self.checkpoint


def check_options(**given: Any) -> FindOptions:
    """``FindOptions`` from ``find``'s keyword arguments, each checked.

    Raises:
        InputError: a value out of range, naming it and what is allowed.
    """
    theta = check_number("theta", given["theta"], 0.0, None, low_open=True)
    alpha = check_number("alpha", given["alpha"], 0.0, 1.0, low_open=True, high_open=True)
    budget = given["budget"]
    if budget is not None:
        budget = check_number("budget", budget, 0.0, None, low_open=True)
    overspend = check_number("max_overspend", given["max_overspend"], 0.0, None)
    patience = given["patience"]
    if patience is not None:
        patience = check_count("patience", patience)
    options = given["estimator_options"]
    if options is not None and not isinstance(options, dict):
        raise InputError(f"estimator_options must be a dict of the estimator's options; got {options!r}")
    if options and options.get("edge_positions"):
        raise InputError("find does not search position-resolved edges; drop edge_positions from estimator_options")
    return FindOptions(
        **{
            **given,
            "theta": theta,
            "alpha": alpha,
            "budget": budget,
            "max_overspend": overspend,
            "direction": check_direction(given["direction"]),
            "patience": patience,
            "max_rounds": check_count("max_rounds", given["max_rounds"]),
            "seed": check_count("seed", given["seed"], SEED_MIN),
            "batch_size": check_batch_size(given["batch_size"]),
            "memory_gb": check_memory_gb(given["memory_gb"]),
        }
    )
