#!/bin/bash
# One-command demo on Debian 12: installs dependencies, builds pincached, makes a
# SoftHSM demo token, runs a private dbus-daemon and pincached (caching mode,
# ForceLoginBeforeSignKeyUsage=0x40), and lets scripts/demo-client.py narrate.
# Everything it starts is stopped on exit; logs stay in <repo>/demo-run/.
# Env: PINCACHE_SKIP_DEPS=1 skips install-deps.sh; PINCACHE_SCRATCH as in env.sh.
set -euo pipefail
. "$(dirname "$0")/env.sh"
cd "$repo"

if [ "${PINCACHE_SKIP_DEPS:-0}" != 1 ]; then
    scripts/install-deps.sh
fi
echo "demo: building pincached"
swift build --scratch-path "$scratch" --product pincached
pincached=$PINCACHE_BUILD_DIR/pincached

run=$repo/demo-run
rm -rf "$run"
mkdir -p "$run"
pids=()
cleanup() {
    local rc=$?
    for ((i=${#pids[@]}-1; i>=0; i--)); do
        kill -TERM "${pids[i]}" 2>/dev/null || true
        wait "${pids[i]}" 2>/dev/null || true
    done
    if [ $rc -ne 0 ]; then
        echo "demo: FAILED (exit $rc). pincached log ($run/pincached.log):" >&2
        sed 's/^/  | /' "$run/pincached.log" >&2 2>/dev/null || true
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

scripts/make-demo-token.sh "$run/softhsm"

cat >"$run/bus.conf" <<CONF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>pincache-demo</type>
  <listen>unix:path=$run/bus.sock</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
    <allow own="*"/>
  </policy>
</busconfig>
CONF
dbus-daemon --config-file="$run/bus.conf" --nofork --nopidfile --print-address=1 \
    >"$run/bus.address" 2>"$run/bus.log" &
pids+=($!)
for _ in $(seq 100); do
    [ -s "$run/bus.address" ] && break
    sleep 0.1
done
address=$(head -n1 "$run/bus.address")
[ -n "$address" ] || { echo "demo: dbus-daemon did not start: $(cat "$run/bus.log")" >&2; exit 1; }
echo "demo: private bus at $address"

cat >"$run/pincache.cfg" <<CONF
# demo configuration (see README "Configuration")
P11_EnableCachePIN=1
P11_LogoutAfterSign=0
ForceLoginBeforeSignKeyUsage=0x40
Module=/usr/lib/softhsm/libsofthsm2.so
CONF
SOFTHSM2_CONF=$run/softhsm/softhsm2.conf \
    "$pincached" --bus "$address" --config "$run/pincache.cfg" 2>"$run/pincached.log" &
daemon_pid=$!
pids+=("$daemon_pid")
echo "demo: pincached started (pid $daemon_pid), log in $run/pincached.log"

"$python" scripts/demo-client.py --address "$address" --wait 20 --pid "$daemon_pid"
echo "demo: OK"
