# Two commands do all set-up: `make run` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
STATE_DIR ?= .state
PYTHON_FOUND = $(shell scripts/find-python.sh)
PY := $(VENV)/bin/python

.PHONY: run test bench venv clean help

help:
	@echo "make run    - set up (.venv) and start the gateway on the embedded defaults"
	@echo "make test   - set up (.venv) and run the whole test suite"
	@echo "make bench  - run the benchmarks (prints numbers beside their baselines)"
	@echo "make clean  - remove .venv and the local state dir"

$(VENV)/.installed: pyproject.toml
	@py="$$(scripts/find-python.sh)" || exit 1; \
	  echo "using $$py ($$($$py --version))"; \
	  [ -x $(PY) ] || "$$py" -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/egress gateway run --state-dir $(STATE_DIR)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

bench: venv
	$(PY) benchmarks/bench_decision.py
	$(PY) benchmarks/bench_gateway.py
	$(PY) benchmarks/bench_inject.py
	$(PY) benchmarks/bench_audit.py
	$(PY) benchmarks/bench_sandbox_isolate.py

clean:
	rm -rf $(VENV) $(STATE_DIR)
