# remotedialer-py: `make demo` and `make test` on a fresh machine.
#
#   make demo      system packages (as root), install the package, run the demo
#   make test      the same set-up plus test dependencies, C unit tests, pytest
#   make ctest     C unit tests only (ASan + UBSan), binaries in build/ctest/
#   make asan-test the pytest suite against an ASan + UBSan build of the engine
#   make fuzz      libFuzzer targets in fuzz/ for FUZZ_SECONDS each (clang)
#   make fuzz-ci   the same, FUZZ_CI_SECONDS each (CI's short pass)
#   make bench     the benchmark: one table, figures into docs/ (BENCH_ARGS: its flags)
#   make docs      regenerate docs/API.md from the docstrings
#   make deps      apt-get install what is missing (root only; checks first)
#
# Variables: PYTHON (the interpreter of every target; default python3), CC, CLANG, FUZZ_SECONDS, FUZZ_CI_SECONDS, PYTEST_ARGS, BENCH_ARGS.

PYTHON ?= python3
FUZZ_SECONDS ?= 60
FUZZ_CI_SECONDS ?= 15
PYTEST_ARGS ?= -q
CLANG ?= clang

# Steps must run in order (deps before build before tests).
.NOTPARALLEL:
.DEFAULT_GOAL := help

DEB_PACKAGES := libuv1-dev libssl-dev pkg-config gcc make curl ca-certificates prometheus valgrind iproute2 tinyproxy chromium
# For the fuzz targets only (`make fuzz-deps`): clang and its libFuzzer
# runtime (libclang-rt-dev names the default version's, e.g. 14 on Debian 12).
FUZZ_DEB_PACKAGES := clang libclang-rt-dev

# Debian's own python3 refuses `pip install` outside a virtual environment
# (PEP 668); there, everything is installed into .venv instead.
EXTERNALLY_MANAGED := $(shell $(PYTHON) -c 'import os, sys, sysconfig; \
  print(int(sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))' 2>/dev/null)
ifeq ($(EXTERNALLY_MANAGED),1)
PY := .venv/bin/python
VENV := .venv/bin/python
else
PY := $(PYTHON)
VENV :=
endif

ENGINE_SRC := $(filter-out csrc/rd_pymod.c,$(sort $(wildcard csrc/*.c)))
HEADERS := $(sort $(wildcard csrc/*.h))
CTEST_SRC := $(sort $(wildcard tests/c/test_*.c))
CTEST_BIN := $(patsubst tests/c/%.c,build/ctest/%,$(CTEST_SRC))
CTEST_FLAGS := -std=gnu11 -Wall -Wextra -Werror -g -O1 -fsanitize=address,undefined \
  -fno-omit-frame-pointer -Icsrc
FUZZ_SRC := $(sort $(wildcard fuzz/fuzz_*.c))
FUZZ_BIN := $(patsubst fuzz/%.c,build/fuzz/%,$(FUZZ_SRC))
LIBS := -luv -lssl -lcrypto -lpthread
# Sanitizer reports must fail the run, not scroll by.
SAN_ENV := ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1

.PHONY: help demo test ctest pytest asan-test build deps testdeps fuzz fuzz-ci fuzz-deps bench \
  docs clean _demo _test

help:
	@sed -n '3,/^[^#]/s/^# \{0,1\}//p' Makefile

# The set-up steps are run by a second make so that the Python chosen above is
# chosen again after `deps` may have installed one.
demo: deps
	@$(MAKE) --no-print-directory _demo

test: deps
	@$(MAKE) --no-print-directory _test

_demo: build
	$(PY) -m remotedialer_py demo

_test: build testdeps ctest pytest

pytest:
	$(PY) -m pytest $(PYTEST_ARGS)

# The end-to-end suite against an extension built with ASan and UBSan (the
# runtime preloaded into every Python the tests start). Leaks are not asked of
# ASan here (CPython's own allocations would drown them); the engine's counting
# allocator checks those (tests/test_exit.py, the leak fixture). Left out: tests
# that run non-Python tools (they would inherit the preload; the packaging test
# runs the compiler), the C unit tests
# (`make ctest` runs them under ASan already) and RSS-margin tests (ASan's
# quarantine holds freed memory by design). Reports go to build/asan-report.*
# and fail the run. The normal extension is rebuilt afterwards.
ASAN_PYTEST_ENV := LD_PRELOAD=$$($(CC) -print-file-name=libasan.so) \
  ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:log_path=$(CURDIR)/build/asan-report \
  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:log_path=$(CURDIR)/build/asan-report
asan-test: build testdeps
	mkdir -p build && rm -f build/asan-report.*
	RD_SANITIZE=1 $(PY) setup.py -q build_ext --inplace
	@status=0; \
	$(ASAN_PYTEST_ENV) $(PY) -m pytest -q -p no:cacheprovider --ignore=tests/test_codec_vectors.py \
	  -k "not curl and not promtool and not soak and not churn and not valgrind and not browser" \
	  -m "not packaging" || status=$$?; \
	if ls build/asan-report.* >/dev/null 2>&1; then cat build/asan-report.*; status=1; fi; \
	$(PY) setup.py -q build_ext --inplace; \
	exit $$status

deps:
	@set -e; \
	if ! command -v dpkg >/dev/null 2>&1; then \
	  echo "deps: not a Debian system; install libuv, OpenSSL headers, pkg-config and a C compiler yourself"; \
	  exit 0; \
	fi; \
	missing=""; \
	for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || \
	    missing="$$missing $$p"; \
	done; \
	if ! command -v $(PYTHON) >/dev/null 2>&1; then \
	  missing="$$missing python3 python3-dev python3-venv python3-pip"; \
	else \
	  inc=$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])'); \
	  [ -f "$$inc/Python.h" ] || missing="$$missing python3-dev"; \
	  if [ "$(EXTERNALLY_MANAGED)" = 1 ] && ! $(PYTHON) -c 'import ensurepip' >/dev/null 2>&1; then \
	    missing="$$missing python3-venv"; \
	  fi; \
	fi; \
	if [ -z "$$missing" ]; then echo "deps: system packages present"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "deps: apt-get install$$missing"; \
	  apt-get update; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	else \
	  echo "deps: missing Debian packages:$$missing"; \
	  echo "deps: run 'sudo apt-get install$$missing' (or run make as root)"; \
	fi

.venv/bin/python:
	$(PYTHON) -m venv .venv

# An editable install: the extension is built in place, `remotedialer-py` is
# on PATH, and the source tree is what gets imported. Without build isolation,
# so that no download is needed once setuptools is present.
build: $(VENV)
	@$(PY) -c 'import setuptools, wheel' >/dev/null 2>&1 || $(PY) -m pip install --quiet setuptools wheel
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .

testdeps: $(VENV)
	$(PY) -m pip install --quiet pytest websockets hypothesis prometheus_client mypy build

ctest: $(CTEST_BIN)
	@fail=0; n=0; \
	for t in $(CTEST_BIN); do \
	  n=$$((n + 1)); echo "== $$t"; \
	  $(SAN_ENV) ./$$t || { echo "FAILED: $$t"; fail=$$((fail + 1)); }; \
	done; \
	echo "C unit tests: $$n programs, $$fail failed"; \
	[ $$fail -eq 0 ]

build/ctest/%: tests/c/%.c $(ENGINE_SRC) $(HEADERS) $(wildcard tests/c/rd_test*.h)
	@mkdir -p $(@D)
	$(CC) $(CTEST_FLAGS) $< $(ENGINE_SRC) $(LIBS) -o $@

# Each target runs from its seeds (fuzz/corpus/NAME) plus what earlier runs
# found (build/fuzz/corpus/fuzz_NAME, kept between runs); a crash, leak or
# timeout stops the run with its input in build/fuzz/artifacts/.
define run_fuzzers
@[ -n "$(FUZZ_BIN)" ] || echo "no fuzz targets in fuzz/"
@set -e; mkdir -p build/fuzz/artifacts; for f in $(FUZZ_BIN); do \
  name=$$(basename $$f); work=build/fuzz/corpus/$$name; \
  seeds=fuzz/corpus/$$name; [ -d $$seeds ] || seeds=fuzz/corpus/$${name#fuzz_}; \
  mkdir -p $$work; \
  echo "== $$name for $(1) s (seeds: $$seeds)"; \
  [ -d $$seeds ] || seeds=; \
  $(SAN_ENV) ./$$f -max_total_time=$(1) -timeout=25 -print_final_stats=1 \
    -artifact_prefix=build/fuzz/artifacts/$$name- $$work $$seeds; \
done
endef

fuzz: fuzz-deps $(FUZZ_BIN)
	$(call run_fuzzers,$(FUZZ_SECONDS))

fuzz-ci: fuzz-deps $(FUZZ_BIN)
	$(call run_fuzzers,$(FUZZ_CI_SECONDS))

# Succeeds when $(CLANG) can build a libFuzzer target with the sanitizers;
# otherwise installs FUZZ_DEB_PACKAGES (root on Debian) or says what to install.
FUZZ_PROBE = mkdir -p build/fuzz && \
  printf 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { (void)d; (void)n; return 0; }\n' \
  | $(CLANG) -x c -fsanitize=fuzzer,address,undefined -o build/fuzz/.probe - >/dev/null 2>&1

fuzz-deps:
	@set -e; \
	if $(FUZZ_PROBE); then rm -f build/fuzz/.probe; echo "fuzz-deps: $(CLANG) builds libFuzzer targets"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "fuzz-deps: apt-get install $(FUZZ_DEB_PACKAGES)"; \
	  apt-get update; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(FUZZ_DEB_PACKAGES); \
	  if $(FUZZ_PROBE); then rm -f build/fuzz/.probe; exit 0; fi; \
	  echo "fuzz-deps: $(CLANG) still cannot build libFuzzer targets"; exit 1; \
	fi; \
	echo "fuzz-deps: $(CLANG) cannot build libFuzzer targets; install the Debian packages $(FUZZ_DEB_PACKAGES)"; \
	exit 1

build/fuzz/%: fuzz/%.c fuzz/fuzz.h $(ENGINE_SRC) $(HEADERS)
	@mkdir -p $(@D)
	$(CLANG) -std=gnu11 -g -O1 -fsanitize=fuzzer,address,undefined -fno-omit-frame-pointer \
	  -Icsrc $< $(ENGINE_SRC) $(LIBS) -o $@

# The figures need matplotlib (the `plot` extra), installed here only; phase
# r's relay baseline needs socat (installed as root on Debian, else skipped).
bench: build
	@$(PY) -c 'import matplotlib' >/dev/null 2>&1 || $(PY) -m pip install --quiet matplotlib
	@command -v socat >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get install -y -q socat >/dev/null 2>&1; } || \
	  echo "bench: socat is not installed; phase r runs without its relay baseline"
	$(PY) bench/bench.py --png-dir docs $(BENCH_ARGS)

# The API reference is generated (tests/test_apidoc.py checks it is current);
# written through a temporary file so that a failure leaves the page whole.
docs: build
	$(PY) -m remotedialer_py._apidoc > docs/API.md.tmp
	mv docs/API.md.tmp docs/API.md
	$(PY) -m remotedialer_py._optdoc typed > remotedialer_py/option_types.py.tmp
	mv remotedialer_py/option_types.py.tmp remotedialer_py/option_types.py

clean:
	rm -rf build dist .pytest_cache *.egg-info remotedialer_py/*.so
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
