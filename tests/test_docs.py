"""The API reference: every public name has an example that runs, and a section in docs/reference/api.md.

The examples are the ``Example:`` sections of the docstrings (doctests, on the built-in toy model);
``docs/reference/api.md`` renders the same docstrings (``make docs``).
"""

import doctest
from pathlib import Path

import pytest

import atpstar

DATA = ("METHODS", "NODE_TYPES", "__version__")  # no docstring of their own: shown in the package docstring
API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "reference" / "api.md"
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def test_every_public_name_has_a_section_in_the_api_reference():
    text = API_PAGE.read_text(encoding="utf-8")
    sections = {line.split()[-1].rsplit(".", 1)[-1] for line in text.splitlines() if line.startswith("::: atpstar.")}
    missing = [n for n in atpstar.__all__ if n not in sections and f"`atpstar.{n}`" not in text]
    assert not missing, f"add these to {API_PAGE.name}: {missing}"


def test_the_names_without_a_docstring_have_examples_in_the_package_docstring():
    lines = [line for line in (atpstar.__doc__ or "").splitlines() if line.strip().startswith(">>>")]
    missing = [n for n in DATA if not any(f"atpstar.{n}" in line for line in lines)]
    assert not missing, f"add an example of {missing} to the docstring of atpstar/__init__.py"


@pytest.mark.parametrize("name", ["atpstar", *sorted(set(atpstar.__all__) - set(DATA))])
def test_the_example_of_every_public_name_runs(name):
    obj = atpstar if name == "atpstar" else getattr(atpstar, name)
    tests = [t for t in doctest.DocTestFinder(recurse=False).find(obj, name, globs={}) if t.examples]
    assert tests, f"atpstar.{name} has no example: add an 'Example:' section with >>> lines to its docstring"
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
