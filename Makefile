# Every target installs what it needs into .venv first (pinned by constraints.txt).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest constraints bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

## Start the gateway in front of the built-in simulated upstream (no network, no key).
demo: $(STAMP)
	$(BIN)/gateway demo

## The whole test suite: lint, strict type check, then pytest.
test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

## Re-pin constraints.txt from what is installed in .venv (after changing pyproject.toml).
constraints: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable --disable-pip-version-check | grep -v '^-e ' > constraints.txt

## The benchmark (by hand, never in CI): direct vs the gateway vs LiteLLM; see bench/README.md.
## Extra flags: make bench BENCH_ARGS="--no-litellm" (or --transport-experiment, --duration 10, ...).
bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/validation_cost.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache dist
