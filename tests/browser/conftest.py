"""Chromium driven by Selenium, and reports of toy-ioi results to open in it.

The tests skip, naming the fix, when Selenium, Chromium or chromedriver is missing: ``make test``
installs Chromium where apt-get is available (``apt-get install chromium chromium-driver``); Selenium
comes with ``pip install -e '.[dev]'``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from chromium_driver import start_chromium

from atpstar.cli import main


@pytest.fixture(scope="session")
def chromium():
    driver = start_chromium()
    yield driver
    driver.quit()


def _cli(args: list[str]) -> None:
    assert main([*args, "--no-progress"]) == 0


@pytest.fixture(scope="session")
def reports(tmp_path_factory) -> dict[str, Path]:
    """report.html of toy-ioi results: ``circuit`` (atp, atp*), ``edges`` (run --nodes edge --verify 12),
    ``nodes`` (run over every node type, --verify 12)."""
    start_chromium().quit()  # skip before the runs when there is no browser
    root = tmp_path_factory.mktemp("viewer")
    common = ["--model", "toy-ioi", "--task", "ioi"]
    _cli(["circuit", *common, "--method", "atp,atp*", "--out", str(root / "circuit")])
    _cli(["run", *common, "--nodes", "edge", "--verify", "12", "--no-plots", "--out", str(root / "edges")])
    _cli(["run", *common, "--verify", "12", "--no-plots", "--out", str(root / "nodes")])
    return {name: root / name / "report.html" for name in ("circuit", "edges", "nodes")}
