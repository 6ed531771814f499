#!/bin/bash
# shlibdeps.sh STAGE FILE... — the Depends that dpkg-shlibdeps computes for these ELF files
# (libc6 (>= 2.34), libdbus-1-3 (>= 1.9.14), ...), as one line. dpkg-shlibdeps wants a
# debian/control to read, so it runs in a scratch source tree.
set -euo pipefail
stage=$(cd "$1" && pwd)
shift
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir "$scratch/debian"
printf 'Source: pincache\n\nPackage: pincache\nArchitecture: any\n' > "$scratch/debian/control"
args=()
for file in "$@"; do args+=("-e$stage/$file"); done
(cd "$scratch" && dpkg-shlibdeps -O "${args[@]}") | sed -n 's/^shlibs:Depends=//p'
