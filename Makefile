# envoy-obs: observability extension pack for Envoy 1.40.0 (dynamic modules).
#
#   make demo    build the modules, run Envoy with every module + a local collector and Prometheus (DURATION=s)
#   make test    every test: Rust unit tests, lint, ABI bindings check, real-Envoy integration tests
#   make bench   CPU cost vs Envoy's built-ins: access loggers (file, OTel) and tracers (see bench/README.md)
#
# Each target installs what it needs (scripts/setup.sh: a .venv with Envoy 1.40.0, Debian tools).

CARGO ?= cargo
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: all build setup test unit lint check-bindings bindings integration demo bench faults clean

all: build

setup:
	./scripts/setup.sh

build:
	$(CARGO) build --release

unit:
	$(CARGO) test --workspace

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The checked-in abi/src/bindings.rs must be what bindgen makes of abi/include/envoy_obs_abi.h.
check-bindings: setup
	$(CARGO) run -q -p envoy-obs-abi-gen -- --check

bindings: setup
	$(CARGO) run -q -p envoy-obs-abi-gen

integration: setup build
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

test: setup lint unit check-bindings integration

demo: setup build
	$(PY) scripts/demo.py $(if $(DURATION),--duration $(DURATION))

faults: setup build
	rm -f .work/faults.json
	$(PY) -m pytest -q tests/test_faults.py
	$(PY) scripts/faults_table.py

bench: setup build
	$(CARGO) build --release -p envoy-obs-abi-floor
	$(PY) bench/access_log_bench.py
	$(PY) bench/tracer_bench.py
	$(PY) bench/stats_sink_bench.py

clean:
	$(CARGO) clean
	rm -rf .work
