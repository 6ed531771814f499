# Front door: `make demo` shows pincache working, `make test` runs every test.
# PINCACHE_SCRATCH overrides the SwiftPM build directory (default .build).
SHELL := /bin/bash
SCRATCH ?= $(or $(PINCACHE_SCRATCH),$(CURDIR)/.build)
export PINCACHE_SCRATCH := $(SCRATCH)
export PATH := $(PATH):/opt/swift/usr/bin

.PHONY: all deps build test integration demo bench clean install uninstall deb reliability

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

# ---- Installation and packaging -------------------------------------------------------
# `make install PREFIX=/usr DESTDIR=/tmp/stage` installs what a distribution ships; the
# bus only reads policy and activation files under /usr/share and /etc, so PREFIX=/usr
# is the useful one. The sample configuration always goes to $(DESTDIR)/etc/pincache/
# and never replaces an existing one.
PREFIX ?= /usr/local
DESTDIR ?=
VERSION := $(shell sed -n 's/.*static let version = "\(.*\)"/\1/p' Sources/PincacheService/Interfaces.swift)
DEB_ARCH := $(shell dpkg --print-architecture 2>/dev/null || echo amd64)
MULTIARCH := $(shell gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
# Debian keeps units in /lib/systemd/system; other prefixes get their own lib/systemd.
UNITDIR ?= $(if $(filter /usr,$(PREFIX)),/lib/systemd/system,$(PREFIX)/lib/systemd/system)
RELEASE_DIR = $(SCRATCH)/release
PROXY = $(RELEASE_DIR)/libpincache-pkcs11.so
INSTALL ?= install

# Swift's runtime and Foundation linked in, so the installed programs need no toolchain.
# The proxy (issue 3) is built when Package.swift has its product.
define build-release
	swift build -c release --static-swift-stdlib --scratch-path "$(SCRATCH)" --product pincached
	swift build -c release --static-swift-stdlib --scratch-path "$(SCRATCH)" --product pincachectl
	if grep -q '"pincache-pkcs11"' Package.swift; then \
		swift build -c release --scratch-path "$(SCRATCH)" --product pincache-pkcs11; fi
endef

# Copies a release build into $(DESTDIR)$(PREFIX) (shared by install and deb).
define install-files
	$(INSTALL) -d "$(DESTDIR)$(PREFIX)/sbin" "$(DESTDIR)$(PREFIX)/bin"
	$(INSTALL) -s -m 755 "$(RELEASE_DIR)/pincached" "$(DESTDIR)$(PREFIX)/sbin/pincached"
	$(INSTALL) -s -m 755 "$(RELEASE_DIR)/pincachectl" "$(DESTDIR)$(PREFIX)/bin/pincachectl"
	$(INSTALL) -D -m 644 dbus/org.pincache.conf "$(DESTDIR)$(PREFIX)/share/dbus-1/system.d/org.pincache.conf"
	$(INSTALL) -D -m 644 dbus/org.pincache.Daemon.service \
		"$(DESTDIR)$(PREFIX)/share/dbus-1/system-services/org.pincache.Daemon.service"
	$(INSTALL) -d "$(DESTDIR)$(PREFIX)/share/dbus-1/interfaces"
	$(INSTALL) -m 644 dbus/org.pincache.*.xml "$(DESTDIR)$(PREFIX)/share/dbus-1/interfaces/"
	$(INSTALL) -D -m 644 polkit/org.pincache.policy "$(DESTDIR)$(PREFIX)/share/polkit-1/actions/org.pincache.policy"
	$(INSTALL) -D -m 644 polkit/rules.d/50-pincache.rules \
		"$(DESTDIR)$(PREFIX)/share/doc/pincache/examples/50-pincache.rules"
	$(INSTALL) -D -m 644 packaging/pincached.service "$(DESTDIR)$(UNITDIR)/pincached.service"
	@# The proxy (issue 3) and its p11-kit registration only once it has been built.
	@if [ -f "$(PROXY)" ]; then \
		echo "installing the PKCS#11 proxy"; \
		$(INSTALL) -D -m 644 "$(PROXY)" "$(DESTDIR)$(PREFIX)/lib/$(MULTIARCH)/pkcs11/libpincache-pkcs11.so" && \
		$(INSTALL) -D -m 644 packaging/pincache.module "$(DESTDIR)$(PREFIX)/share/p11-kit/modules/pincache.module"; \
	else echo "no $(PROXY): PKCS#11 proxy and pincache.module not installed"; fi
	$(INSTALL) -d "$(DESTDIR)/etc/pincache"
	@if [ -e "$(DESTDIR)/etc/pincache/pincache.cfg" ]; then \
		echo "keeping existing $(DESTDIR)/etc/pincache/pincache.cfg"; \
	else $(INSTALL) -m 644 packaging/pincache.cfg "$(DESTDIR)/etc/pincache/pincache.cfg"; fi
	for page in pincachectl.1 pincache.cfg.5 pincached.8; do \
		section=$${page##*.}; \
		$(INSTALL) -d "$(DESTDIR)$(PREFIX)/share/man/man$$section" && \
		gzip -9n < packaging/man/$$page > "$(DESTDIR)$(PREFIX)/share/man/man$$section/$$page.gz" && \
		chmod 644 "$(DESTDIR)$(PREFIX)/share/man/man$$section/$$page.gz" || exit 1; \
	done
endef

install:
	$(build-release)
	$(install-files)

# Removes what install put there, except /etc/pincache (configuration is the admin's).
uninstall:
	rm -f "$(DESTDIR)$(PREFIX)/sbin/pincached" "$(DESTDIR)$(PREFIX)/bin/pincachectl" \
		"$(DESTDIR)$(PREFIX)/share/dbus-1/system.d/org.pincache.conf" \
		"$(DESTDIR)$(PREFIX)/share/dbus-1/system-services/org.pincache.Daemon.service" \
		"$(DESTDIR)$(PREFIX)/share/dbus-1/interfaces/"org.pincache.*.xml \
		"$(DESTDIR)$(PREFIX)/share/polkit-1/actions/org.pincache.policy" \
		"$(DESTDIR)$(UNITDIR)/pincached.service" \
		"$(DESTDIR)$(PREFIX)/lib/$(MULTIARCH)/pkcs11/libpincache-pkcs11.so" \
		"$(DESTDIR)$(PREFIX)/share/p11-kit/modules/pincache.module" \
		"$(DESTDIR)$(PREFIX)/share/man/man1/pincachectl.1.gz" \
		"$(DESTDIR)$(PREFIX)/share/man/man5/pincache.cfg.5.gz" \
		"$(DESTDIR)$(PREFIX)/share/man/man8/pincached.8.gz"
	rm -rf "$(DESTDIR)$(PREFIX)/share/doc/pincache"

# build/pincache_<version>_<arch>.deb from a release build, staged with install-files;
# plain dpkg-deb, no debhelper. The package's postinst creates the system user.
DEB_STAGE = build/deb
DEB_FILE = build/pincache_$(VERSION)_$(DEB_ARCH).deb
deb: override DESTDIR = $(CURDIR)/$(DEB_STAGE)
deb: override PREFIX = /usr
deb:
	$(build-release)
	rm -rf "$(DEB_STAGE)"
	$(install-files)
	$(INSTALL) -D -m 644 packaging/debian/copyright "$(DEB_STAGE)/usr/share/doc/pincache/copyright"
	$(INSTALL) -d "$(DEB_STAGE)/DEBIAN"
	$(INSTALL) -m 644 packaging/debian/conffiles "$(DEB_STAGE)/DEBIAN/conffiles"
	$(INSTALL) -m 755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm "$(DEB_STAGE)/DEBIAN/"
	sed -e 's/@VERSION@/$(VERSION)/' -e 's/@ARCH@/$(DEB_ARCH)/' \
		-e "s/@SIZE@/$$(du -sk --exclude=DEBIAN "$(DEB_STAGE)" | cut -f1)/" \
		packaging/debian/control > "$(DEB_STAGE)/DEBIAN/control"
	dpkg-deb --root-owner-group -Zxz --build "$(DEB_STAGE)" "$(DEB_FILE)"
	@echo "built $(DEB_FILE)"
