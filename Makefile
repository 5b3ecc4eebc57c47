# The two commands: `make run` and `make test`. Both install what is missing first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck format install bench bench-routing bench-streaming clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python scripts/dev.py

test: lint
	$(BIN)/python -m pytest -q

# ruff, the type check, and the import contracts (pyproject.toml: [tool.mypy], [tool.importlinter]).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MAKE) --no-print-directory typecheck
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/streaming.py

# Streaming alone: TTFT and pacing added by the exchange, concurrent-stream capacity.
bench-streaming: $(STAMP)
	$(BIN)/python bench/streaming.py

# Routing quality in the simulated market (bench/market.toml): regret, errors, shares.
bench-routing: $(STAMP)
	$(BIN)/python bench/routing.py

clean:
	rm -rf var .pytest_cache .ruff_cache
