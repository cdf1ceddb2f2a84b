# The README's two commands:  `make quickstart`  and  `make test`.
VENV ?= .venv
export PYTHONUNBUFFERED = 1

.PHONY: setup quickstart test test-fast lint bench

setup:
	@scripts/setup.sh

quickstart: setup
	$(VENV)/bin/distcl run jobs/quickstart.yaml

test: setup
	$(VENV)/bin/python -m pytest -q

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not ray and not slow"

lint: setup
	$(VENV)/bin/ruff check distcl tests && $(VENV)/bin/ruff format --check distcl tests
