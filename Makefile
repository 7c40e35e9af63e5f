# apilane: `make up` runs the local stack; `make test` sets everything up and runs every test.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: help setup up images test lint typecheck pytest bench clean manifests

help:
	@echo "make up     - the local stack (nats, control plane, discovery, renderer, node-loader, tracing UI)"
	@echo "make images - the container images of the run modes, built here (docs/run-modes.md)"
	@echo "make test   - install everything, then lint, type-check and run every test"
	@echo "make bench  - benchmarks, printed as a table"
	@echo "make manifests - write deploy/*.yaml and deploy/alerts/ from the Helm chart"
	@echo "make clean  - stop nothing, remove local state (.apilane/)"

setup:
	@bash tools/setup.sh

up: setup
	@bash tools/install-tracing-ui.sh >/dev/null
	@$(VENV)/bin/apilane up

images: setup
	$(PY) -m apilane.testing.images

test: setup lint typecheck pytest

lint:
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck:
	$(VENV)/bin/mypy -p apilane.model -p apilane.runtime -p apilane.kube -p apilane.testing -p apilane.discovery -p apilane.renderer -p apilane.node_loader -p apilane.cli

pytest:
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# deploy/*.yaml and deploy/alerts/apilane-rules.yaml are the chart's default rendering.
manifests:
	$(PY) tools/render_manifests.py

bench: setup
	BENCH=$(BENCH) BENCH_ARGS='$(BENCH_ARGS)' $(PY) bench/run.py

clean:
	rm -rf .apilane
