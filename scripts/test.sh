#!/bin/bash
# Builds everything, runs the Swift unit tests, then the integration suite against the
# freshly built pincached. Extra arguments go to pytest (e.g. -k caching).
# CI=true turns every skipped integration test into a failure.
set -euo pipefail
. "$(dirname "$0")/env.sh"
cd "$repo"

swift build --build-tests --scratch-path "$scratch"

status=0
swift test --skip-build --scratch-path "$scratch" --skip ProxyLoopbackTests || status=1
# The proxy and the daemon in one process (SoftHSM allows one instance per process, so
# this suite has a process of its own).
PINCACHE_LOOPBACK_TESTS=1 swift test --skip-build --scratch-path "$scratch" --filter ProxyLoopbackTests || status=1
"$python" -m pytest Tests/integration -ra "$@" || status=1
# The system tests install the .deb and run the real system bus and polkitd: root only
# (they skip elsewhere; with CI=true a skip is a failure, and CI runs as root).
if [ "$(id -u)" -eq 0 ] || [ "${CI:-}" = true ]; then
    "$python" -m pytest Tests/system -ra "$@" || status=1
fi

if [ $status -ne 0 ]; then
    echo "test.sh: FAILED" >&2
else
    echo "test.sh: all tests passed"
fi
exit $status
