#!/bin/bash
# Creates (or extends) a SoftHSM2 token store under DIR with one demo token:
#   EC P-256 key   CKA_ID 01, label "ec-key",     cert keyUsage digitalSignature
#   RSA-2048 key   CKA_ID 02, label "rsa-nonrep", cert keyUsage digitalSignature,nonRepudiation
# Usage: make-demo-token.sh DIR [LABEL]
# Env overrides: PINCACHE_DEMO_PIN (123456), PINCACHE_DEMO_SO_PIN (12345678),
#                SOFTHSM_MODULE (/usr/lib/softhsm/libsofthsm2.so).
# Running it again with another LABEL adds a second token to the same store, which
# is how the tests get two tokens behind one SOFTHSM2_CONF.
# Writes DIR/softhsm2.conf and DIR/<LABEL>/{ec,rsa}-cert.{der,pem} (independent
# copies of the certificates, for verifying signatures without the daemon).
set -euo pipefail

dir=${1:?usage: make-demo-token.sh DIR [LABEL]}
label=${2:-pincache-demo}
pin=${PINCACHE_DEMO_PIN:-123456}
so_pin=${PINCACHE_DEMO_SO_PIN:-12345678}
module=${SOFTHSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}

mkdir -p "$dir/tokens"
dir=$(cd "$dir" && pwd)
conf=$dir/softhsm2.conf
if [ ! -f "$conf" ]; then
    cat >"$conf" <<CONF
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
CONF
fi
export SOFTHSM2_CONF=$conf

if softhsm2-util --show-slots 2>/dev/null | grep -q "Label:[[:space:]]*$label\$"; then
    echo "make-demo-token: token '$label' already exists in $dir" >&2
    exit 1
fi

work=$dir/$label
mkdir -p "$work"
# Private key material only exists long enough to be imported.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/ec.pem" 2>/dev/null
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$tmp/rsa.pem" 2>/dev/null
for k in ec rsa; do
    openssl pkcs8 -topk8 -nocrypt -in "$tmp/$k.pem" -out "$tmp/$k.pk8"
done
openssl req -new -x509 -key "$tmp/ec.pem" -days 3650 -subj "/CN=$label ec-key" \
    -addext "keyUsage=critical,digitalSignature" -addext "basicConstraints=CA:FALSE" \
    -out "$work/ec-cert.pem" 2>/dev/null
openssl req -new -x509 -key "$tmp/rsa.pem" -days 3650 -subj "/CN=$label rsa-nonrep" \
    -addext "keyUsage=critical,digitalSignature,nonRepudiation" -addext "basicConstraints=CA:FALSE" \
    -out "$work/rsa-cert.pem" 2>/dev/null
for k in ec rsa; do
    openssl x509 -in "$work/$k-cert.pem" -outform DER -out "$work/$k-cert.der"
done

softhsm2-util --init-token --free --label "$label" --pin "$pin" --so-pin "$so_pin" >/dev/null
softhsm2-util --import "$tmp/ec.pk8" --token "$label" --label ec-key --id 01 --pin "$pin" >/dev/null
softhsm2-util --import "$tmp/rsa.pk8" --token "$label" --label rsa-nonrep --id 02 --pin "$pin" >/dev/null
# Certificates are public objects: visible without login, as the daemon's ListKeys expects.
pkcs11-tool --module "$module" --token-label "$label" --login --pin "$pin" \
    --write-object "$work/ec-cert.der" --type cert --id 01 --label ec-key >/dev/null 2>&1
pkcs11-tool --module "$module" --token-label "$label" --login --pin "$pin" \
    --write-object "$work/rsa-cert.der" --type cert --id 02 --label rsa-nonrep >/dev/null 2>&1

echo "make-demo-token: token '$label' ready (SOFTHSM2_CONF=$conf)"
