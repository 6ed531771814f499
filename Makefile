# Front door: `make demo` shows pincache working, `make test` runs every test.
# PINCACHE_SCRATCH overrides the SwiftPM build directory (default .build).
SHELL := /bin/bash
SCRATCH ?= $(or $(PINCACHE_SCRATCH),$(CURDIR)/.build)
export PINCACHE_SCRATCH := $(SCRATCH)
export PATH := $(PATH):/opt/swift/usr/bin

.PHONY: all deps build test integration demo bench clean reliability

all: build

deps:
	scripts/install-deps.sh

build:
	swift build --scratch-path "$(SCRATCH)"

test:
	scripts/test.sh

# The integration suite alone, against an existing build.
integration:
	PINCACHE_BUILD_DIR="$(SCRATCH)/debug" /usr/bin/python3 -m pytest Tests/integration -ra

demo:
	scripts/demo.sh

# Signature latency: SoftHSM direct, p11-kit remoting, the proxy in both modes
# (bench/README.md). `make bench BENCH_ARGS=--quick` for a CI-sized run.
bench:
	/usr/bin/python3 bench/run.py $(BENCH_ARGS)

# Floods, races, quotas, concurrency, PIN hygiene, chaos, fuzzing, sanitizers, with a figures
# table (docs/reliability.md). CI-sized by default; `make reliability RELIABILITY=long` for releases.
reliability:
	RELIABILITY=$(or $(RELIABILITY),ci) scripts/reliability.sh

clean:
	rm -rf "$(SCRATCH)" demo-run
