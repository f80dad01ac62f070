# hypercache developer tasks. `make test` works from a fresh clone: it creates
# .venv, installs the package (compiling the Cython core) with the dev extras,
# then runs pytest, ruff and mypy.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# Sources of the compiled core, and the mark of its last in-place build.
CORE   := $(wildcard hypercache/_core/*.pyx hypercache/_core/*.pxd) setup.py
BUILT  := hypercache/_core/.built

.PHONY: dev build test quicktest bench chaos kpi soak run run-tls lint fmt clean

# The editable install in "compat" mode compiles the extensions in place, once:
# the build below finds them up to date.
$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)
	touch $(BUILT)

dev: $(STAMP)

# Recompile the extensions in place when a .pyx/.pxd changed (editable installs do
# not rebuild on edit).
$(BUILT): $(STAMP) $(CORE)
	$(PY) setup.py --quiet build_ext --inplace -j 2
	touch $(BUILT)

build: $(BUILT)

test: build
	$(PY) -m pytest -q
	$(PY) -m ruff check hypercache tests bench examples
	$(PY) -m ruff format --check hypercache tests bench examples
	$(PY) -m mypy

quicktest: build
	$(PY) -m pytest -q -x -m "not functional"

bench: build
	$(PY) -m bench.report
	$(PY) -m bench.cluster_report
	$(PY) -m bench.convergence_report
	$(PY) -m bench.rebalance_report
	$(PY) -m bench.observe_report

# The chaos scenarios of tests/chaos at full length (their short forms run in `make
# test`), each printing its summary line.
chaos: build
	CHAOS_LONG=1 $(PY) -m pytest -q -s -p no:cacheprovider tests/chaos

# The roadmap's KPIs as pytest-benchmark benchmarks (bench/bench_kpi.py, their JSON in
# kpi-benchmarks.json): kpi-report.md and kpi-latency.png (bench/kpi_report.py), with
# the last `make soak`'s figures when soak-results.jsonl is there.
kpi: build
	$(PY) -m bench.kpi_report --long $(addprefix --soak-results ,$(wildcard soak-results.jsonl))

# 30 minutes of a steady mix with TTLs, deletes and periodic faults: every node's RSS
# slope after warm-up must stay within noise, and the caps hold (bench/soak.py).
soak: build
	$(PY) -m bench.soak --minutes 30 --results soak-results.jsonl

run: build
	$(PY) -m hypercache.cli.local

# The same over mTLS, with a throw-away CA, an admin token and a cluster secret.
run-tls: build
	$(PY) -m hypercache.cli.local --tls

lint: $(STAMP)
	$(PY) -m ruff check hypercache tests bench examples
	$(PY) -m ruff format --check hypercache tests bench examples
	$(PY) -m mypy

fmt: $(STAMP)
	$(PY) -m ruff format hypercache tests bench examples
	$(PY) -m ruff check --fix hypercache tests bench examples

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .benchmarks
	rm -f kpi-report.md kpi-latency.png
	find hypercache -name '*.so' -delete
	rm -f $(BUILT)
	find hypercache/_core -name '*.c' -delete
	find hypercache/_core -name '*.html' -delete
