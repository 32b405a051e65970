# Every target installs what it needs into .venv first (pinned by constraints.txt): `demo` only the
# runtime, every other target the whole dev toolchain (`test` still installs everything).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt
RUNTIME_STAMP := $(VENV)/.installed-runtime
STAMP  := $(VENV)/.installed-dev
# Extra flags for `make demo`, e.g. DEMO_ARGS="--keys" or DEMO_ARGS="--port 9090 --config my.toml".
DEMO_ARGS ?=
# Extra flags for `make pytest`, e.g. PYTEST_ARGS="tests/proxy -x" or PYTEST_ARGS="-n 0" (one process).
PYTEST_ARGS ?=

.PHONY: demo test lint typecheck pytest constraints bench docs clean

$(RUNTIME_STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $(RUNTIME_STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e ".[dev]"
	touch $(STAMP) $(RUNTIME_STAMP)

## Start the gateway in front of the built-in simulated upstream (no network, no key).
demo: $(RUNTIME_STAMP)
	$(BIN)/gateway demo $(DEMO_ARGS)

## The whole test suite: lint, strict type check, then pytest.
test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

## On every CPU (pytest-xdist); one file's tests stay on one worker, so its module fixtures start once.
pytest: $(STAMP)
	bash tests/system-packages.sh
	$(BIN)/pytest -n auto --dist loadfile $(PYTEST_ARGS)

## Re-pin constraints.txt from what is installed in .venv (after changing pyproject.toml).
constraints: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable --disable-pip-version-check | grep -v '^-e ' > constraints.txt

## The benchmark (by hand, never in CI): direct vs the gateway vs Portkey and LiteLLM; see bench/README.md.
## Extra flags: make bench BENCH_ARGS="--no-litellm --no-portkey" (or --transport-experiment, --duration 10, ...).
bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/validation_cost.py

## Regenerate docs/configuration.md from the settings schema and config/gateway.toml's comments.
docs: $(RUNTIME_STAMP)
	$(BIN)/python -m gateway.config.reference > docs/configuration.md.tmp
	mv docs/configuration.md.tmp docs/configuration.md

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache dist
