#!/bin/bash
# split-debug.sh STAGE DBGSTAGE FILE... — what dh_strip does for a -dbgsym package: each
# ELF file's debug information goes to DBGSTAGE/usr/lib/debug/.build-id/xx/yyyy.debug,
# the file itself is stripped (executables of everything but their symbols for dynamic
# linking, shared objects of what they do not need) and keeps a debuglink to it.
# DBGSTAGE/build-ids lists the build ids, for the dbgsym package's control file.
set -euo pipefail
stage=$1 dbg=$2
shift 2
ids=()
for file in "$@"; do
    path="$stage/$file"
    id=$(readelf -n "$path" | sed -n 's/^ *Build ID: *//p')
    [ -n "$id" ] || { echo "split-debug: $file has no build id" >&2; exit 1; }
    debug="$dbg/usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug"
    install -d "$(dirname "$debug")"
    objcopy --only-keep-debug --compress-debug-sections "$path" "$debug"
    chmod 644 "$debug"
    case "$file" in
        *.so*) strip --remove-section=.comment --remove-section=.note --strip-unneeded "$path" ;;
        *) strip --remove-section=.comment --remove-section=.note "$path" ;;
    esac
    objcopy --add-gnu-debuglink="$debug" "$path"
    ids+=("$id")
done
install -d "$dbg/usr/share/doc"
ln -sfn pincache "$dbg/usr/share/doc/pincache-dbgsym"
echo "${ids[*]}" > "$dbg/build-ids"
