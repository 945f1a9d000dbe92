"""A lock on an output folder, so two processes never work on (and overwrite) the same results.

The lock is ``fcntl.flock`` on ``FOLDER/.atpstar.lock``: the operating system releases it when the
holder exits, also on SIGKILL, so a crash never leaves a stale lock. The file records the holder's
pid and start time for the message the second process prints.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import BusyError, InputError

LOCK_NAME = ".atpstar.lock"


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[None]:
    """Hold the lock of ``folder`` for the block.

    Raises:
        BusyError: another process holds it (the message names its pid and start time).
        InputError: the folder cannot be created or written.
    """
    folder = Path(folder)
    path = folder / LOCK_NAME
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX: no lock, nothing else changes
        yield
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise InputError(
            f"cannot write to output folder {folder}: {err.strerror or err}; choose another --out"
        ) from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise BusyError(
                f"output folder {folder} is in use by {holder}; wait for it to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"atpstar pid {os.getpid()} (started {time.strftime('%Y-%m-%d %H:%M:%S')})".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def check_writable(folder: str | Path) -> Path:
    """Create ``folder`` and prove a file can be written there, before any work starts.

    Raises:
        InputError: the folder cannot be created or is not writable (read-only, no permission, full disk).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".atpstar-write-test-{os.getpid()}"
        with open(probe, "wb") as handle:
            handle.write(b"x" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as err:
        raise InputError(
            f"output folder {folder} is not writable: {err.strerror or err}; choose another --out"
        ) from err
    return folder
