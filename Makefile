# Front door: `make demo` shows pincache working, `make test` runs every test.
# PINCACHE_SCRATCH overrides the SwiftPM build directory (default .build).
SHELL := /bin/bash
SCRATCH ?= $(or $(PINCACHE_SCRATCH),$(CURDIR)/.build)
export PINCACHE_SCRATCH := $(SCRATCH)
export PATH := $(PATH):/opt/swift/usr/bin

.PHONY: all deps build test integration demo bench clean install uninstall deb lintian reliability

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
# `make install` strips; `make deb` splits the debug symbols off into pincache-dbgsym instead.
INSTALL_STRIP ?= -s

# Swift's runtime linked in, so the installed programs need no toolchain. Hardened as
# Debian's build flags would (lintian checks them): full RELRO, immediate binding, and the C
# shims with _FORTIFY_SOURCE and a stack protector.
HARDENING = -Xlinker -z -Xlinker relro -Xlinker -z -Xlinker now \
	-Xcc -D_FORTIFY_SOURCE=2 -Xcc -fstack-protector-strong
define build-release
	swift build -c release --static-swift-stdlib $(HARDENING) --scratch-path "$(SCRATCH)" --product pincached
	swift build -c release --static-swift-stdlib $(HARDENING) --scratch-path "$(SCRATCH)" --product pincachectl
	swift build -c release $(HARDENING) --scratch-path "$(SCRATCH)" --product pincache-pkcs11
endef

# Copies a release build into $(DESTDIR)$(PREFIX) (shared by install and deb).
define install-files
	$(INSTALL) -d "$(DESTDIR)$(PREFIX)/sbin" "$(DESTDIR)$(PREFIX)/bin"
	$(INSTALL) $(INSTALL_STRIP) -m 755 "$(RELEASE_DIR)/pincached" "$(DESTDIR)$(PREFIX)/sbin/pincached"
	$(INSTALL) $(INSTALL_STRIP) -m 755 "$(RELEASE_DIR)/pincachectl" "$(DESTDIR)$(PREFIX)/bin/pincachectl"
	$(INSTALL) -d "$(DESTDIR)$(PREFIX)/share/bash-completion/completions" \
		"$(DESTDIR)$(PREFIX)/share/zsh/vendor-completions" "$(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d"
	@# bash-completion sources the file: no #! line (lintian: bash-completion-with-hashbang).
	"$(RELEASE_DIR)/pincachectl" --generate-completion-script bash | sed '1{/^#!/d}' \
		> "$(DESTDIR)$(PREFIX)/share/bash-completion/completions/pincachectl"
	"$(RELEASE_DIR)/pincachectl" --generate-completion-script zsh \
		> "$(DESTDIR)$(PREFIX)/share/zsh/vendor-completions/_pincachectl"
	"$(RELEASE_DIR)/pincachectl" --generate-completion-script fish \
		> "$(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/pincachectl.fish"
	chmod 644 "$(DESTDIR)$(PREFIX)/share/bash-completion/completions/pincachectl" \
		"$(DESTDIR)$(PREFIX)/share/zsh/vendor-completions/_pincachectl" \
		"$(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/pincachectl.fish"
	$(INSTALL) -D -m 644 dbus/org.pincache.conf "$(DESTDIR)$(PREFIX)/share/dbus-1/system.d/org.pincache.conf"
	$(INSTALL) -D -m 644 dbus/org.pincache.Daemon.service \
		"$(DESTDIR)$(PREFIX)/share/dbus-1/system-services/org.pincache.Daemon.service"
	$(INSTALL) -d "$(DESTDIR)$(PREFIX)/share/dbus-1/interfaces"
	$(INSTALL) -m 644 dbus/org.pincache.*.xml "$(DESTDIR)$(PREFIX)/share/dbus-1/interfaces/"
	$(INSTALL) -D -m 644 polkit/org.pincache.policy "$(DESTDIR)$(PREFIX)/share/polkit-1/actions/org.pincache.policy"
	$(INSTALL) -D -m 644 docs/logging.md "$(DESTDIR)$(PREFIX)/share/doc/pincache/logging.md"
	$(INSTALL) -D -m 644 polkit/rules.d/50-pincache.rules \
		"$(DESTDIR)$(PREFIX)/share/doc/pincache/examples/50-pincache.rules"
	$(INSTALL) -D -m 644 packaging/pincached.service "$(DESTDIR)$(UNITDIR)/pincached.service"
	$(INSTALL) -D $(INSTALL_STRIP) -m 644 "$(PROXY)" "$(DESTDIR)$(PREFIX)/lib/$(MULTIARCH)/pkcs11/libpincache-pkcs11.so"
	$(INSTALL) -D -m 644 packaging/pincache.module "$(DESTDIR)$(PREFIX)/share/p11-kit/modules/pincache.module"
	$(INSTALL) -D -m 755 packaging/p11-kit-routing "$(DESTDIR)$(PREFIX)/libexec/pincache/p11-kit-routing"
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
		"$(DESTDIR)$(PREFIX)/libexec/pincache/p11-kit-routing" \
		"$(DESTDIR)$(PREFIX)/share/man/man1/pincachectl.1.gz" \
		"$(DESTDIR)$(PREFIX)/share/man/man5/pincache.cfg.5.gz" \
		"$(DESTDIR)$(PREFIX)/share/man/man8/pincached.8.gz" \
		"$(DESTDIR)$(PREFIX)/share/bash-completion/completions/pincachectl" \
		"$(DESTDIR)$(PREFIX)/share/zsh/vendor-completions/_pincachectl" \
		"$(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/pincachectl.fish"
	rm -rf "$(DESTDIR)$(PREFIX)/share/doc/pincache"

# build/pincache_<version>_<arch>.deb and its pincache-dbgsym from a release build, staged
# with install-files and assembled as debhelper would (no debian/rules: SwiftPM builds):
# debug symbols split off by build id, Depends from dpkg-shlibdeps, md5sums, the changelog.
# `make lintian` checks both packages (0 errors; warnings only those in
# packaging/debian/lintian-overrides, each with its reason).
DEB_STAGE = build/deb
DBGSYM_STAGE = build/deb-dbgsym
DEB_FILE = build/pincache_$(VERSION)_$(DEB_ARCH).deb
DBGSYM_FILE = build/pincache-dbgsym_$(VERSION)_$(DEB_ARCH).deb
DEB_MAINTAINER ?= pincache developers <pincache@example.org>
deb: override DESTDIR = $(CURDIR)/$(DEB_STAGE)
deb: override PREFIX = /usr
deb: INSTALL_STRIP =
deb:
	@changelog=$$(sed -n '1s/^pincache (\([^)]*\)).*/\1/p' packaging/debian/changelog); \
	if [ "$$changelog" != "$(VERSION)" ]; then \
		echo "packaging/debian/changelog is at $$changelog, the sources at $(VERSION): add an entry" >&2; exit 1; fi
	$(build-release)
	rm -rf "$(DEB_STAGE)" "$(DBGSYM_STAGE)"
	$(install-files)
	$(INSTALL) -D -m 644 packaging/debian/copyright "$(DEB_STAGE)/usr/share/doc/pincache/copyright"
	gzip -9n < packaging/debian/changelog > "$(DEB_STAGE)/usr/share/doc/pincache/changelog.gz"
	chmod 644 "$(DEB_STAGE)/usr/share/doc/pincache/changelog.gz"
	$(INSTALL) -D -m 644 packaging/debian/lintian-overrides "$(DEB_STAGE)/usr/share/lintian/overrides/pincache"
	scripts/split-debug.sh "$(DEB_STAGE)" "$(DBGSYM_STAGE)" \
		usr/sbin/pincached usr/bin/pincachectl usr/lib/$(MULTIARCH)/pkcs11/libpincache-pkcs11.so
	$(INSTALL) -d "$(DEB_STAGE)/DEBIAN" "$(DBGSYM_STAGE)/DEBIAN"
	$(INSTALL) -m 644 packaging/debian/conffiles "$(DEB_STAGE)/DEBIAN/conffiles"
	$(INSTALL) -m 644 packaging/debian/triggers "$(DEB_STAGE)/DEBIAN/triggers"
	$(INSTALL) -m 755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm "$(DEB_STAGE)/DEBIAN/"
	shlibs=$$(scripts/shlibdeps.sh "$(DEB_STAGE)" usr/sbin/pincached usr/bin/pincachectl \
		usr/lib/$(MULTIARCH)/pkcs11/libpincache-pkcs11.so) && \
	sed -e 's/@VERSION@/$(VERSION)/' -e 's/@ARCH@/$(DEB_ARCH)/' -e "s/@SHLIBS@/$$shlibs/" \
		-e "s/@MAINTAINER@/$(DEB_MAINTAINER)/" \
		-e "s/@SIZE@/$$(du -sk --exclude=DEBIAN "$(DEB_STAGE)" | cut -f1)/" \
		packaging/debian/control > "$(DEB_STAGE)/DEBIAN/control"
	sed -e 's/@VERSION@/$(VERSION)/' -e 's/@ARCH@/$(DEB_ARCH)/' -e "s/@MAINTAINER@/$(DEB_MAINTAINER)/" \
		-e "s/@BUILDIDS@/$$(cat "$(DBGSYM_STAGE)/build-ids")/" \
		-e "s/@SIZE@/$$(du -sk --exclude=DEBIAN --exclude=build-ids "$(DBGSYM_STAGE)" | cut -f1)/" \
		packaging/debian/control.dbgsym > "$(DBGSYM_STAGE)/DEBIAN/control"
	rm "$(DBGSYM_STAGE)/build-ids"
	for stage in "$(DEB_STAGE)" "$(DBGSYM_STAGE)"; do \
		(cd "$$stage" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | LC_ALL=C sort -z \
			| xargs -0 md5sum > DEBIAN/md5sums) && chmod 644 "$$stage/DEBIAN/md5sums" || exit 1; \
	done
	dpkg-deb --root-owner-group -Zxz --build "$(DEB_STAGE)" "$(DEB_FILE)"
	dpkg-deb --root-owner-group -Zxz --build "$(DBGSYM_STAGE)" "$(DBGSYM_FILE)"
	@echo "built $(DEB_FILE) and $(DBGSYM_FILE)"

lintian:
	lintian --fail-on error,warning --display-info "$(DEB_FILE)" "$(DBGSYM_FILE)"
