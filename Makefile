# dask-rs: `make demo` runs the main job, `make test` runs every test.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.deps-stamp
export PYO3_PYTHON := $(abspath $(PY))
export CARGO_TERM_COLOR ?= never

.PHONY: build venv ext wheel demo test test-rust test-python lint fmt fuzz bench bench-quick bench-sim clean

build: target/release/dask-ctl ext

target/release/dask-ctl: FORCE
	cargo build --release -p dask-ctl

# The project's Python environment: build and test dependencies from PyPI.
$(STAMP): Makefile python/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "maturin>=1.5,<2" pytest pytest-timeout ruff \
		"dask[array,dataframe,bag]" distributed numpy pandas cloudpickle tblib prometheus-client \
		cryptography
	touch $(STAMP)

venv: $(STAMP)

# Build the extension and install dask_rs into the venv (editable).
ext: $(STAMP)
	rm -rf python/wheel-data && mkdir -p python/wheel-data
	cd python && VIRTUAL_ENV=$(abspath $(VENV)) ../$(VENV)/bin/maturin develop --release --quiet

# Wheels for pip: the extension (stable ABI) and the dask-ctl command, in
# $(WHEEL_OUT). WHEEL_ABI=py311 (zero-copy, CPython 3.11 and later) and
# py39 (copies bytes, CPython 3.9 and later); both by default.
WHEEL_ABI ?= py39 py311
WHEEL_OUT ?= target/wheels
wheel: target/release/dask-ctl $(STAMP)
	rm -rf python/wheel-data && mkdir -p python/wheel-data/scripts
	cp target/release/dask-ctl python/wheel-data/scripts/dask-ctl
	strip python/wheel-data/scripts/dask-ctl
	for abi in $(WHEEL_ABI); do \
		(cd python && ../$(VENV)/bin/maturin build --release --strip --quiet --features abi3-$$abi \
			--out $(abspath $(WHEEL_OUT))) || exit 1; \
	done
	rm -rf python/wheel-data && mkdir -p python/wheel-data

demo: build
	$(PY) examples/demo.py

test: build test-rust test-python

test-rust:
	cargo test --release --workspace --exclude python --exclude bench-plot

# Stand-ins for Marathon and the Kubernetes API (tests/servers), for the
# backends' end-to-end tests.
target/release/dask-rs-test-server: FORCE
	cargo build --release -p test-servers

test-python: ext target/release/dask-rs-test-server
	$(PY) -m pytest tests/python -q -p no:cacheprovider

lint: $(STAMP)
	cargo fmt --all -- --check
	cargo clippy --release --workspace --all-targets -- -D warnings
	cargo clippy --release -p python --features abi3-py39 -- -D warnings
	$(VENV)/bin/ruff check python tests examples bench

fmt:
	cargo fmt --all
	$(VENV)/bin/ruff check --fix python tests examples bench

# The fuzz tests for longer than in `make test`, and with a fresh seed
# (DASK_RS_FUZZ_SECS, default 600: ten minutes against a live cluster, a
# quarter of that in process; DASK_RS_FUZZ_SEED replays a run).
fuzz:
	DASK_RS_FUZZ_SECS=$${DASK_RS_FUZZ_SECS:-600} DASK_RS_FUZZ_SEED=$${DASK_RS_FUZZ_SEED:-$$(date +%s%N)} \
		cargo test --release --test fuzz -- --nocapture

# dask-rs side by side with Dask distributed; writes bench/results/latest.{md,json}.
# Then many workers and graph-size growth (bench/results/scale.*), drawn as
# bench/results/{workers,growth}.png.
bench: build
	$(PY) bench/suite.py
	$(PY) bench/scale.py
	cargo run --release --quiet -p bench-plot -- bench/results

# A subset for after runtime changes (under 2 minutes); bench/results/quick.{md,json}.
bench-quick: build
	$(PY) bench/suite.py --quick

# The scheduler alone with simulated workers.
bench-sim:
	cargo bench --bench scheduler_sim

clean:
	cargo clean
	rm -rf $(VENV)

FORCE:
