# Agentsite: `make demo` shows it working; `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Tests run against the real services: Postgres and Redis on this machine by default. Each
# checkout's suite has a database and a Redis key space (its tasks' queues included) of its own,
# named after the checkout's path, so two checkouts can run `make test` side by side.
CHECKOUT_ID := $(shell printf '%s' "$(CURDIR)" | cksum | cut -d ' ' -f 1)
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/agentsite
TEST_DB_NAME ?= test_agentsite_$(CHECKOUT_ID)
TEST_BROKER_URL ?= redis://127.0.0.1:6379/15
TEST_REDIS_KEY_PREFIX ?= agentsite-test-$(CHECKOUT_ID):
# The suite runs on this many processes (pytest-xdist; each has its own test database, key prefix
# and queues: tests/support/parallel.py). Most of its time is spent waiting on real processes,
# so more than the 2 cores of a small machine.
TEST_WORKERS ?= 3
PYTEST_PARALLEL = -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder
# make up: where the API and Flower listen.
PORT ?= 8000
FLOWER_PORT ?= 5555

.PHONY: help venv demo test test-fast lint services up migrate fake-openai clean browser-deps bench chaos env

help:
	@echo "make demo   - install, migrate, seed and run the demo agents on a real worker"
	@echo "make test   - the whole suite against Postgres and Redis (started if installed), on"
	@echo "              TEST_WORKERS=3 xdist processes; PYTEST_ARGS=tests/x.py for one file"
	@echo "make test-fast - the suite without real worker/API processes or chaos/demo runs (<1 min)"
	@echo "make lint   - ruff (lint + format check) and mypy"
	@echo "make up     - web server, worker, beat and Flower for local use (PORT, FLOWER_PORT)"
	@echo "make browser-deps - Debian's chromium for the browser test (apt-get, as root)"
	@echo "make bench  - the benchmark suite (BENCH_ARGS=--quick for a short run; see bench/README.md)"
	@echo "make chaos  - the fault-injection suite: kills workers, restarts Redis and Postgres (CHAOS_ARGS=--help)"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# A development .env (DEBUG=1, a generated SECRET_KEY), written once if absent, so that the
# README's manage.py commands run with nothing to export (agentsite/envfile.py).
env: venv
	@$(BIN)/python -m agentsite.envfile

migrate: env
	DEBUG=$${DEBUG:-1} $(BIN)/python manage.py migrate --noinput -v 0
	DEBUG=$${DEBUG:-1} $(BIN)/python manage.py seed_demo

demo: migrate
	DEBUG=$${DEBUG:-1} $(BIN)/python manage.py demo

# Start Postgres and Redis where they are installed but not running (no-op otherwise).
services:
	@pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || { \
	  echo "starting PostgreSQL"; \
	  command -v pg_ctlcluster >/dev/null && \
	    pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql | tail -n 1) main start; \
	  for i in $$(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done; }
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || { \
	  echo "starting Redis"; \
	  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null; \
	  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
	    --dir /var/lib/redis --logfile /var/log/redis/agentsite.log; \
	  for i in $$(seq 30); do redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && break; sleep 1; done; }

# Debian's Chromium for the browser test (tests/approvals/test_browser.py drives it with
# Playwright); never Playwright's own browser downloads.
browser-deps:
	@command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

# Best effort: without apt, root or the network, the browser test skips and says why.
test: venv services
	@$(MAKE) --no-print-directory browser-deps || echo "chromium not installed: browser test will skip"
	DEBUG=1 AGENTSITE_ENV_FILE= PYTHONDONTWRITEBYTECODE= DATABASE_URL=$(TEST_DATABASE_URL) CELERY_BROKER_URL=$(TEST_BROKER_URL) \
	  AGENTSITE_TEST_DB_NAME=$(TEST_DB_NAME) AGENTSITE_REDIS_KEY_PREFIX=$(TEST_REDIS_KEY_PREFIX) \
	  $(BIN)/python -m pytest $(PYTEST_PARALLEL) $(PYTEST_ARGS)

# Day-to-day: what needs no Celery worker, API server or deployment of its own (the tests marked
# integration, or grouped as processes by tests/support/parallel.py).
test-fast: venv services
	DEBUG=1 AGENTSITE_ENV_FILE= PYTHONDONTWRITEBYTECODE= DATABASE_URL=$(TEST_DATABASE_URL) CELERY_BROKER_URL=$(TEST_BROKER_URL) \
	  AGENTSITE_TEST_DB_NAME=$(TEST_DB_NAME) AGENTSITE_REDIS_KEY_PREFIX=$(TEST_REDIS_KEY_PREFIX) \
	  $(BIN)/python -m pytest $(PYTEST_PARALLEL) -m "not integration and not processes" \
	  --ignore=tests/integration --ignore=tests/approvals/test_browser.py --reuse-db $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	DEBUG=1 $(BIN)/mypy agentsite agents tools approvals audittrail harness

# The fault-injection suite (about 2 minutes): a Postgres and a Redis of its own (it restarts
# them), real workers/beat/API, faults while runs are submitted. `make chaos CHAOS_ARGS=--help`.
chaos: venv
	$(BIN)/python -m chaos $(CHAOS_ARGS)

# The benchmark suite, never part of `make test`: its own database (agentsite_bench) and Redis
# DB (13), real worker/web/beat processes. `make bench BENCH_ARGS="--quick"`; `--help` for flags.
bench: venv services
	$(BIN)/python -m bench $(BENCH_ARGS)

# The worker runs gevent on Postgres + Redis (as deployed); on the embedded SQLite default it
# runs two prefork children, since gevent cannot wait on SQLite's lock (the worker says so).
# honcho is told to read no .env (-e /dev/null): it would put the file's values over the
# environment's; the settings read .env themselves, under the environment.
up: migrate
	@if [[ "$${DATABASE_URL:-}" == postgres* && "$${CELERY_BROKER_URL:-}" == redis* ]]; then \
	  pool=gevent; concurrency=$${WORKER_CONCURRENCY:-200}; prefetch=2; \
	else pool=prefork; concurrency=2; prefetch=1; fi; \
	flower_password=$${FLOWER_PASSWORD:-$$($(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(12))')}; \
	echo "API and admin: http://127.0.0.1:$(PORT)  metrics: :$(PORT)/metrics (web), :$${AGENTSITE_WORKER_METRICS_PORT:-9808}/metrics (worker)"; \
	echo "Flower: http://127.0.0.1:$(FLOWER_PORT)  user $${FLOWER_USER:-admin}, password $$( [[ -n "$${FLOWER_PASSWORD:-}" ]] && echo 'from FLOWER_PASSWORD' || echo "$$flower_password (set FLOWER_PASSWORD to choose)")"; \
	DEBUG=$${DEBUG:-1} WORKER_POOL=$$pool WORKER_CONCURRENCY=$$concurrency WORKER_PREFETCH=$$prefetch \
	  FLOWER_PASSWORD=$$flower_password PORT=$(PORT) FLOWER_PORT=$(FLOWER_PORT) \
	  PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho start -f Procfile -e /dev/null

fake-openai: venv
	$(BIN)/python -m harness.fake_server --port 8765

clean:
	rm -rf $(VENV) .data .pytest_cache .ruff_cache .mypy_cache
