"""The ``atpstar`` command line: demo, run, compare, verify, bound, models, methods.

Every command writes into ``--out``: results as safetensors + JSON (``Attribution.save``,
``Verification.save``), a CSV of top nodes, plots (PNG and SVG) and a self-contained ``report.html``.
User errors print ``error: ...`` to stderr and exit with code 2, without a traceback.

Modules: ``parser`` (the argparse options), ``common`` (option parsing, loading the model and the
prompt pairs, running a method, verifying, bounding), ``output`` (files, table and report of a run),
``commands`` (one function per command). ``commands`` imports ``output`` and ``common``, ``output``
imports ``common``, ``parser`` imports none of them; this module joins ``parser`` and ``commands``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..errors import AtpstarError
from .commands import COMMANDS
from .common import parse_nodes, parse_options
from .parser import build_parser

__all__ = ["COMMANDS", "build_parser", "main", "parse_nodes", "parse_options"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) is None:
        parser.print_help()
        return 2
    try:
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        return int(COMMANDS[args.command](args) or 0)
    except AtpstarError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (a ground-truth sweep resumes from its checkpoint when rerun)", file=sys.stderr)
        return 130
