#!/bin/bash
# Installs every Debian 12 package that building, testing and the demo need.
# Swift itself is not a Debian package: it is expected in PATH or /opt/swift/usr/bin
# (https://www.swift.org/install/linux/ — Swift 6.x for Debian 12).
# Skips apt entirely when everything is already installed, so repeated runs are fast
# and work offline.
set -euo pipefail

packages=(
    # build: C libraries the Swift targets link, and the Swift toolchain's own needs
    pkg-config libdbus-1-dev libp11-kit-dev libpcsclite-dev
    binutils gcc libc6-dev libstdc++-12-dev libgcc-12-dev libedit2 libsqlite3-0 libxml2 zlib1g
    tzdata git ca-certificates make
    # packaging: dpkg-shlibdeps for Depends, lintian for the package check (make deb, make lintian)
    dpkg-dev lintian
    # the GDBus example in docs/examples (built and run by the integration tests)
    libglib2.0-dev
    # runtime and tests: bus, tokens, PKCS#11 tools, clients
    dbus dbus-daemon dbus-bin p11-kit softhsm2 opensc gnutls-bin openssl pcscd procps
    python3 python3-dbus python3-gi python3-pytest python3-cryptography
    # virtual smart card for insertion/removal tests (DESIGN §6)
    vsmartcard-vpcd vsmartcard-vpicc python3-pycryptodome
)

missing=()
for p in "${packages[@]}"; do
    if [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" != installed ]; then
        missing+=("$p")
    fi
done

if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}"
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "install-deps: need root or sudo" >&2; exit 1; }
        sudo=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update
    "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
else
    echo "install-deps: all ${#packages[@]} Debian packages present"
fi

if ! command -v swift >/dev/null && [ ! -x /opt/swift/usr/bin/swift ]; then
    echo "install-deps: Swift 6 toolchain not found (PATH or /opt/swift/usr/bin)." >&2
    echo "  Install it from https://www.swift.org/install/linux/ (Debian 12 tarball into /opt/swift)." >&2
    exit 1
fi
