"""Every command-line value checked before anything is loaded: counts, finite numbers, dtype, device,
method options, the output folder, and a memory prediction for the requested size."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import InputError
from ..validate import check_count, check_device, check_finite_options, check_memory, check_number

DTYPES = ("float32", "float64", "bfloat16", "float16")

# argument name -> minimum for integer counts (None: not a count of that command)
COUNTS = {
    "threads": 1,
    "top": 1,
    "verify": 0,
    "budget": 0,
    "n_pairs": 1,
    "pairs": 1,
    "seq_len": 1,
    "k_max": 1,
    "samples": 1,
    "bound_samples": 0,
}


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad values of the parsed arguments with a clear message (before the model loads).

    Raises:
        InputError: a count below its minimum, a non-finite or out-of-range number, an unknown dtype or
            device, a device that is not there, or a request too large for this machine's memory.
        AtpstarError: plots asked for (no ``--no-plots``) without matplotlib installed.
    """
    for name, minimum in COUNTS.items():
        value = getattr(args, name, None)
        if value is not None:
            check_count(f"--{name.replace('_', '-')}", value, minimum)
    if getattr(args, "theta", None) is not None:
        check_number("--theta", args.theta, 0.0, None, low_open=True)
    if getattr(args, "threshold", None) is not None:
        check_number("--threshold", args.threshold, 0.0)
    if getattr(args, "p", None) is not None:
        check_number("--p", args.p, 0.0, 1.0, low_open=True, high_open=True)
    if getattr(args, "alpha", None) is not None:
        check_number("--alpha", args.alpha, 0.0, 1.0, low_open=True, high_open=True)
    if getattr(args, "dtype", None) is not None and args.dtype not in DTYPES:
        raise InputError(
            f"--dtype {args.dtype!r} is not a floating-point dtype atpstar computes in; choose one of {list(DTYPES)}"
        )
    if getattr(args, "device", None) is not None:
        check_device(args.device)
    if getattr(args, "draws_plots", False) and not args.no_plots:  # refuse now, not after the computation
        from ..plots import require_matplotlib

        require_matplotlib("--no-plots")
    pairs = getattr(args, "n_pairs", None) or getattr(args, "pairs", None)
    if pairs is not None:
        # The prompt tokens alone (clean and noise, int64) must fit; activations need far more.
        seq_len = max(8, getattr(args, "seq_len", None) or 8)
        check_memory(2 * 8 * pairs * seq_len, f"{pairs} prompt pairs", "ask for fewer pairs (--n-pairs)")


def check_option_values(options: dict[str, dict[str, Any]]) -> None:
    """Refuse NaN and infinite numbers anywhere in method options (JSON accepts 'NaN' and 'Infinity')."""
    for method, values in options.items():
        check_finite_options(f"--option {method}:", values)
