# README's commands: `make demo` and `make test` (each sets up .venv first when needed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench bench-quick bench-venv

setup: $(STAMP)

$(STAMP): pyproject.toml mindformers_conv/_floatcast.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

demo: setup
	$(PY) -m mindformers_conv.demo demo-out

test: setup
	$(PY) -m pytest -q

# Benchmarks (benchmarks/README.md): the full run sets up the MindFormers reference venv first (once,
# minutes, benchmarks/.venv-mindformers); the quick one uses it when it is there.
bench-venv:
	bash benchmarks/setup_mindformers.sh

bench: setup bench-venv
	$(PY) benchmarks/bench_convert.py --repeat 3 --plot benchmarks/results/bench.png
	$(PY) benchmarks/bench_megatron.py

bench-quick: setup
	$(PY) benchmarks/bench_convert.py --quick
