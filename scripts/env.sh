# Sourced by the other scripts: puts Swift on PATH and names the build directory.
# PINCACHE_SCRATCH  SwiftPM scratch path (default <repo>/.build)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if ! command -v swift >/dev/null && [ -x /opt/swift/usr/bin/swift ]; then
    PATH=$PATH:/opt/swift/usr/bin
fi
scratch=${PINCACHE_SCRATCH:-$repo/.build}
export PINCACHE_BUILD_DIR=${PINCACHE_BUILD_DIR:-$scratch/debug}
# Debian's python3 has python3-dbus; a pyenv or venv python on PATH usually does not.
python=/usr/bin/python3
