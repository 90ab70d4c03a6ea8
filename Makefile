# lbcore - the two commands a new user needs are `make demo` and `make test`.
# Everything else the project needs (Debian packages, a .venv with Python
# packages) is installed by the targets themselves, on a fresh Debian machine.

PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.deps-stamp
# bird2 and keepalived: the multi-gateway lab (BGP towards a router, VRRP on the rack);
# chromium and tmux: the tests look at the status page and `lbcore top` as a person would;
# prometheus: promtool checks the shipped alerting rules; clang + its runtime: the libFuzzer
# harness; iputils-ping: the tests ping the VIP; liburing-dev: the TUN worker's io_uring path
# (linked statically, so wheels built here need nothing on the target; without it the build
# falls back to read()/write())
APT_PKGS := gcc make iproute2 procps bird2 keepalived chromium tmux prometheus clang \
            libclang-rt-14-dev iputils-ping liburing-dev
PYTEST_ARGS ?=

.PHONY: all deps apt-deps build test test-sanitize fuzz bench bench-lab demo lint vagrant-check vagrant-lab clean

all: build

# Debian packages: only the missing ones are installed (cheap when none is missing, so
# `make test` checks every time: a package added to APT_PKGS reaches an existing checkout).
apt-deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# Debian packages, then the venv with the package (editable) and its test+bench extras.
$(STAMP): pyproject.toml setup.py
	@$(MAKE) --no-print-directory apt-deps
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip 'setuptools>=68' wheel 'Cython>=3.0,<4'
	$(VPY) -m pip install -q --no-build-isolation -e '.[test,bench]'
	touch $@

deps: $(STAMP)

# LB_TESTING=1: also lbcore._testing, the benchmark and stress loops the
# tests and bench/ use (a plain `pip install .` builds only lbcore._core).
build: $(STAMP)
	LB_TESTING=1 $(VPY) setup.py -q build_ext --inplace

test: apt-deps build vagrant-check test-sanitize
	$(MAKE) fuzz FUZZ_SECONDS=60
	$(VPY) -m pytest -q $(PYTEST_ARGS)

# The libFuzzer harness over the C packet path (tests/fuzz/fuzz_pipeline.c),
# with ASan and UBSan, for FUZZ_SECONDS. It starts from the seed corpus in
# tests/fuzz/corpus (read only) and keeps what it finds in build/fuzz/corpus;
# a crash leaves its input in build/fuzz/ and fails the target.
FUZZ_SECONDS ?= 60
FUZZ_BIN := build/fuzz/fuzz_pipeline
FUZZ_SRC := $(wildcard ext/lb_*.c) tests/fuzz/fuzz_pipeline.c
$(FUZZ_BIN): $(FUZZ_SRC) $(wildcard ext/*.h)
	@missing=""; for p in clang libclang-rt-14-dev; do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	mkdir -p build/fuzz
	clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
	  -Wall -Wextra -Werror -std=gnu11 -Iext $(FUZZ_SRC) -o $@

fuzz: $(FUZZ_BIN)
	mkdir -p build/fuzz/corpus
	$(FUZZ_BIN) -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	  -artifact_prefix=build/fuzz/ build/fuzz/corpus tests/fuzz/corpus

# The fuzz and unit suites again on an ASan/UBSan build, in a copy of the
# tree so that the normal build is left alone. The generated ext/_*.c are
# not copied (cp gives them a fresh mtime, so cythonize would trust stale
# ones). Test files that do not exist (yet) are skipped; netns tests and the
# thread hammer are left out (too slow under ASan). --capture=sys leaves fd 2
# alone, so a sanitizer report is not swallowed by pytest's fd capture.
SAN_TESTS := tests/test_packet.py tests/test_fuzz.py tests/test_maglev.py tests/test_flow.py tests/test_pipeline.py \
             tests/test_persist.py tests/test_sync.py tests/test_admission.py
SAN_DIR   := build/sanitize
test-sanitize: $(STAMP)
	rm -rf $(SAN_DIR) && mkdir -p $(SAN_DIR)
	cp -r lbcore ext tests setup.py pyproject.toml $(SAN_DIR)/
	rm -f $(SAN_DIR)/lbcore/_core*.so $(SAN_DIR)/lbcore/_testing*.so $(SAN_DIR)/ext/_core.c \
	  $(SAN_DIR)/ext/_testing.c
	find $(SAN_DIR) -name __pycache__ -prune -exec rm -rf {} +
	cd $(SAN_DIR) && LB_SANITIZE=1 LB_TESTING=1 $(abspath $(VPY)) setup.py -q build_ext --inplace
	cd $(SAN_DIR) && \
	  LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  PYTHONPATH=. $(abspath $(VPY)) -m pytest -q -p no:cacheprovider --capture=sys -m "not netns" \
	  -k "not thread_hammer" $(wildcard $(SAN_TESTS))

# The micro-benchmarks (pytest-benchmark, no network, ~2 min): the core's stages, and how the
# per-packet cost grows with the flows in the table (1k/1M/16M: a 2^24-slot table, ~1.5 GB) and
# the backends per VIP (bench/bench_scale.py). One file or test: make bench BENCH_ARGS='-k scale'.
BENCH_ARGS ?=
bench: build
	mkdir -p bench/results
	$(VPY) -m pytest bench -q -s --benchmark-only --benchmark-autosave \
	  --benchmark-storage=file://bench/results/micro --benchmark-columns=min,median,mean,stddev,ops \
	  $(BENCH_ARGS)

# The lab benchmark (root; ~22 min): lbcore beside kernel forwarding, nftables DNAT and
# HAProxy on the namespace lab, nginx as the HTTP backends. Installs nftables/haproxy/iperf3/
# wrk/nginx itself. Quick look: make bench-lab BENCH_LAB_ARGS=--quick. See bench/README.md.
BENCH_LAB_ARGS ?=
bench-lab: build
	$(VPY) -m bench.lab.run $(BENCH_LAB_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check lbcore tests bench

# The VM lab (vagrant/, see vagrant/README.md). vagrant-check is cheap and
# offline (ruby -c, vagrant validate, shellcheck, bash -n; installs vagrant,
# vagrant-libvirt, ruby, shellcheck if missing) and `make test` runs it.
vagrant-check:
	bash vagrant/check.sh

# Opt-in, not in CI: builds the box once, brings up gateway + LB_BACKENDS
# (default 3) backends + client under QEMU, sends a few requests through the
# VIP, and destroys everything (also on failure). Minutes, CPU-heavy.
vagrant-lab: $(STAMP)
	LB_PYTHON=$(CURDIR)/$(VPY) bash vagrant/lab.sh

demo: build
	$(VPY) -m lbcore demo

clean:
	rm -rf build ext/_core.c ext/_testing.c ext/*.html lbcore/_core*.so lbcore/_testing*.so \
	  .pytest_cache
