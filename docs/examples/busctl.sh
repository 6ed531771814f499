#!/bin/bash
# pincache from the shell with busctl. Every busctl invocation is a bus connection of its
# own, hence a cache environment of its own: a Login made by one call is gone when that
# busctl exits. From a shell, sign with SignOnce (the PIN for this one call, never cached)
# or keep one connection in a program (cached_pin_session.py).
#
#   PINCACHE_BUS_ADDRESS=unix:path=... ./busctl.sh TOKEN-LABEL KEY-ID-HEX FILE < pin
set -euo pipefail
label=$1 key=$2 file=$3
bus=(--system)
[ -n "${PINCACHE_BUS_ADDRESS:-}" ] && bus=(--address="$PINCACHE_BUS_ADDRESS")
call() { busctl "${bus[@]}" --json=short call org.pincache.Daemon "$@"; }

# GetTokens → ao; pick the token whose Label property matches.
token=""
for path in $(call /org/pincache org.pincache.Manager1 GetTokens | python3 -c 'import json,sys; print(" ".join(json.load(sys.stdin)["data"][0]))'); do
    got=$(busctl "${bus[@]}" --json=short get-property org.pincache.Daemon "$path" org.pincache.Token1 Label |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["data"])')
    [ "$got" = "$label" ] && token=$path && break
done
[ -n "$token" ] || { echo "no token labelled $label" >&2; exit 1; }

# SignOnce(s pin, ay key_id, s mechanism, ay data) → ay: byte arrays are given to busctl as
# a count followed by the bytes.
IFS= read -r pin
bytes() { python3 -c 'import sys; b=bytes.fromhex(sys.argv[1]); print(len(b), *b)' "$1"; }
data=$(python3 -c 'import sys; print(open(sys.argv[1],"rb").read().hex())' "$file")
# shellcheck disable=SC2046
call "$token" org.pincache.Token1 SignOnce saysay "$pin" $(bytes "$key") ECDSA-SHA256 $(bytes "$data") |
    python3 -c 'import json,sys; print(bytes(json.load(sys.stdin)["data"][0]).hex())'

# Card events, as they happen (Ctrl-C to stop):
#   busctl --system monitor --match "type='signal',sender='org.pincache.Daemon',member='TokenInserted'"
