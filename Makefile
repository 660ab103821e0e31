# Two commands matter: `make run` and `make test`. Both need only python3 (3.11+) and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint pytest bench bench-quick chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## run: the whole stack (Postgres, Redis, SMTP sink, API, relay, worker) on this machine
run: install
	$(PY) -m devstack

## test: lint, types, then the whole suite against real servers it starts itself
test: lint pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

pytest: install
	$(PY) -m pytest -p no:cacheprovider

bench: install
	$(PY) -m bench

bench-quick: install
	$(PY) -m bench --quick

## chaos: signups under load while components are killed and restarted; prints a ledger
chaos: install
	$(PY) -m devstack.chaos $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache
