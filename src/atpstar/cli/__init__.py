"""The ``atpstar`` command line: demo, run, compare, verify, bound, find, circuit, models, methods.

Every command writes into ``--out``: results as safetensors + JSON (``Attribution.save``,
``Verification.save``, ``Localization.save``), CSV tables, plots (PNG and SVG) and a self-contained
``report.html``. User errors print ``error: ...`` to stderr and exit with code 2, without a traceback.

Modules, each importing only those listed before it: ``args`` (options several commands share),
``checks`` (values checked before the model loads), ``common`` (option parsing, loading the model and
the prompt pairs, running a method, verifying, bounding), ``output`` (files, table and report of a run),
``find_command`` and ``circuit`` (those commands' options and functions), ``parser`` (the argparse
parser: one sub-parser per command), ``commands`` (one function per command). This module joins
``parser`` and ``commands``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..errors import AtpstarError
from ..lock import check_writable, folder_lock
from .args import attach_dictionaries
from .checks import check_args
from .commands import COMMANDS
from .common import RESUMABLE, interrupt_note, parse_nodes, parse_options
from .parser import build_parser

__all__ = ["COMMANDS", "build_parser", "main", "parse_nodes", "parse_options"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 user error, 130 interrupted).

    Every value is checked before the model loads; the output folder is checked for writability and
    locked against a second process; user errors (bad input, unreadable or unwritable files, a full
    disk, too little memory) print ``error: ...`` and return 2, never a traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) is None:
        parser.print_help()
        return 2
    RESUMABLE.clear()
    try:
        check_args(args)
        attach_dictionaries(args)
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        if getattr(args, "out", None) is None:
            return int(COMMANDS[args.command](args) or 0)
        check_writable(args.out)
        with folder_lock(args.out):
            return int(COMMANDS[args.command](args) or 0)
    except AtpstarError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # files and folders: permissions, a full disk, a vanished path
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory; use fewer prompt pairs, a smaller memory_gb or batch_size", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; {interrupt_note()}", file=sys.stderr)
        return 130
    except RuntimeError as err:
        if "out of memory" not in str(err).lower():
            raise
        print("error: out of memory; use fewer prompt pairs, a smaller memory_gb or batch_size", file=sys.stderr)
        return 2
