# authgate — `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install run test check lint mypy bench soak clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-9s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install authgate with its test tools

run: $(STAMP) ## start Valkey + authgate + nginx + an echo upstream, print demo tokens and curl lines
	$(BIN)/python scripts/devstack.py

test: $(STAMP) ## run the test suite (real Valkey, nginx and uvicorn)
	$(BIN)/pytest

check: lint mypy ## ruff + mypy strict

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

mypy: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP) ## measure the /auth hot path (prints a table, saves bench-results.json)
	$(BIN)/python scripts/bench.py

soak: $(STAMP) ## ten minutes of bounded load with token churn; prints RSS and fd figures
	$(BIN)/python scripts/soak.py

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build src/*.egg-info
