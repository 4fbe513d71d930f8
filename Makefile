# The contributor's loops (CONTRIBUTING.md). `make test` is what CI runs after the quickstart.
PYTHON ?= python

.PHONY: lint types test-fast test

lint:
	$(PYTHON) -m ruff check .

types:
	$(PYTHON) -m mypy

test-fast:
	$(PYTHON) -m pytest -q -m "not slow" tests

test:
	$(PYTHON) -m pytest -q tests
