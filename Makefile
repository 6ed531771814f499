# Front door: `make demo` shows pincache working, `make test` runs every test.
# PINCACHE_SCRATCH overrides the SwiftPM build directory (default .build).
SHELL := /bin/bash
SCRATCH ?= $(or $(PINCACHE_SCRATCH),$(CURDIR)/.build)
export PINCACHE_SCRATCH := $(SCRATCH)
export PATH := $(PATH):/opt/swift/usr/bin

.PHONY: all deps build test integration demo clean

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

clean:
	rm -rf "$(SCRATCH)" demo-run
