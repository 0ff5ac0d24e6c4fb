# README's commands: `make demo` and `make test` (each sets up .venv first when needed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench bench-quick

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

demo: setup
	$(PY) -m mindformers_conv.demo demo-out

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_convert.py

bench-quick: setup
	$(PY) benchmarks/bench_convert.py --quick
