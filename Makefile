# Common tasks of dml_cli. `make help` lists them.
PYTHON ?= python

.PHONY: help install train test test-all lint format bench

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install:  ## Install the package with the test, sweep and TensorBoard extras
	$(PYTHON) -m pip install -e ".[dev]"

train:  ## Train three LeNets on scikit-learn's digits (offline, about 10 s on 2 CPU cores)
	dml-train dataset=digits

test:  ## Run the default test suite
	$(PYTHON) -m pytest -q

bench:  ## Benchmark training speed against a library-style DML loop (options: BENCH_ARGS=...)
	$(PYTHON) benchmarks/bench_throughput.py $(BENCH_ARGS)

lint:  ## Check formatting and lint with ruff
	ruff format --check dml_cli tests benchmarks
	ruff check dml_cli tests benchmarks

format:  ## Format the code with ruff
	ruff format dml_cli tests benchmarks
	ruff check --fix dml_cli tests benchmarks
