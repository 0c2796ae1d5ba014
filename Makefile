# canaryflow: `make demo` runs the whole release on the local stack; `make test` runs every test.
# Both set everything up on a fresh machine: Debian packages, the virtual environment, the project.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# libnginx-mod-http-lua: the router routes from a Lua shared dict (no reloads); etcd-server and prometheus: the
# tests' kube-apiserver store and the Prometheus metrics source; chromium: the UI checks of the demo test (headless)
APT_PACKAGES := nginx libnginx-mod-http-lua wrk etcd-server prometheus chromium
DEMO_ARGS ?=
BENCH_ARGS ?=

.PHONY: all setup system-deps demo test drills test-unit lint bench bench-canary bench-batch clean

all: test

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@command -v java >/dev/null || { echo "TorchServe needs Java 17 (apt-get install openjdk-17-jre-headless)"; exit 1; }

# torch is installed first and pinned: any later resolve that admits another torch pulls GBs of CUDA.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,tensorflow,dask]'
	touch $(STAMP)

setup: system-deps $(STAMP)

demo: setup
	$(BIN)/canaryflow demo $(DEMO_ARGS)

# every test, the release drills (marker `drill`) included: two pytest sessions side by side, each with its own
# stack (tests/run_halves.py); `TEST_ARGS` go to both, e.g. TEST_ARGS=-x
TEST_ARGS ?=
test: setup
	$(BIN)/lint-imports
	$(BIN)/python tests/run_halves.py $(TEST_ARGS)

drills: setup
	$(BIN)/pytest -q -ra --durations=15 -m drill

test-unit: setup
	$(BIN)/pytest -q tests/unit

# our endpoint vs `mlflow models serve` on the same models and load (wrk); `BENCH_ARGS=--quick` for a short run
bench: setup
	$(BIN)/python bench/serving_bench.py $(BENCH_ARGS)

# batch scoring vs pandas chunks + mlflow.pyfunc, 1M and 4M rows x 20 features; `BENCH_ARGS=--quick`: 200k/800k
bench-batch: setup
	$(BIN)/python bench/batch_bench.py $(BENCH_ARGS)

bench-canary: setup
	$(BIN)/python bench/canary_bench.py $(BENCH_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	-$(BIN)/canaryflow down 2>/dev/null
	rm -rf .canaryflow
