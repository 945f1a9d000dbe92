"""The shape of the package (``benchmarks/architecture.py``): no module over 400 lines, no import circles, at
most two imports up the layers, no conditional on a node-type name outside the node spaces.

The checks the tree does not meet yet are marked ``xfail(strict=True)``: the moment one holds, its test
fails until the mark is removed, so a target once reached stays reached.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import atpstar

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "architecture.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("architecture", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("architecture", module)  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


architecture = _load_script()


@pytest.fixture(scope="module")
def figures():
    return architecture.analyse(Path(atpstar.__file__).parent)


def test_every_module_of_the_package_is_measured(figures):
    files = list(Path(atpstar.__file__).parent.rglob("*.py"))
    assert figures.files == len(files) and figures.lines > 0
    assert "__init__" in figures.modules and figures.arrows > 0


def test_no_module_over_400_lines(figures):
    assert figures.long_modules == {}


def test_no_import_circles(figures):
    assert figures.circles == []


def test_at_most_two_imports_run_up_the_layers(figures):
    assert len({(i.source, i.target) for i in figures.upward}) <= 2


def test_no_node_type_conditionals_outside_node_spaces(figures):
    assert figures.node_type_conditions == []


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_analysis_reads_every_kind_of_import(tmp_path, monkeypatch):
    package = _write(
        tmp_path,
        {
            "__init__.py": "from .version import __version__\n",
            "version.py": "__version__ = '1'\n",
            "low.py": "def f():\n    from . import __version__\n    from .sub.high import g\n",
            "sub/__init__.py": "",
            "sub/high.py": (
                "from typing import TYPE_CHECKING\nimport pkg.low\nfrom .. import version\n"
                "if TYPE_CHECKING:\n    from ..low import f\n"
                "def g(t):\n    return t == 'edge' or t in ('query', 'key')\n"
            ),
            "spaces/__init__.py": "def own(t):\n    return t == 'neuron'\n",
            "long.py": "def f():\n" + "    x = 1\n" * 61,
        },
    )
    monkeypatch.setattr(architecture, "LAYERS", [("bottom", ["version", "low", "spaces"]), ("top", ["sub.*", ""])])
    fig = architecture.analyse(package)
    arrows = {(i.source, i.target, i.where) for i in fig.imports}
    assert arrows == {
        ("__init__", "version", "module"),
        ("low", "__init__", "function"),
        ("low", "sub.high", "function"),
        ("sub.high", "low", "module"),
        ("sub.high", "version", "module"),
        ("sub.high", "low", "type"),
    }
    assert fig.circles == [["low", "sub.high"]]
    assert {(i.source, i.target) for i in fig.upward} == {("low", "__init__"), ("low", "sub.high")}
    assert fig.unplaced == ["long", "sub"]
    assert fig.long_functions == [("long:f", 62)]
    assert [c.split(":")[:2] for c in fig.node_type_conditions] == [["sub.high", "7"]] * 2  # two comparisons
    assert "Circles (1)" in architecture.render(fig)
