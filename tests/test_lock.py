"""One process per output folder: a second one is refused with a message naming the first."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from atpstar.errors import BusyError, InputError
from atpstar.lock import LOCK_NAME, check_writable, folder_lock


def test_second_process_is_refused(tmp_path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from atpstar.lock import folder_lock\n"
            f"with folder_lock({str(tmp_path)!r}):\n    print('locked', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(BusyError, match=rf"in use by atpstar pid {holder.pid}"):
            with folder_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.05)
    with folder_lock(tmp_path):  # released by the OS when the holder died (also on SIGKILL)
        assert (tmp_path / LOCK_NAME).exists()


def test_check_writable(tmp_path) -> None:
    assert check_writable(tmp_path / "new" / "out").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not writable"):
        check_writable(tmp_path / "file" / "out")
