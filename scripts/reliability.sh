#!/bin/bash
# Reliability run (issue 6): builds pincached, the fault shim and the proxy, runs every test
# in Tests/reliability/ (flood, disconnect race, quotas, concurrency, PIN hygiene, chaos, ...),
# then scripts/fuzz.sh and scripts/sanitizers.sh when they exist, and prints one table of all
# figures. Exits non-zero if any part failed. docs/reliability.md records a full run.
#
#   RELIABILITY       ci (default: a CI-sized run, minutes on 2 cores) or long (releases)
#   RELIABILITY_OUT   where figures.jsonl and the logs go (default <scratch>/reliability);
#                     emptied at the start
#   RELIABILITY_SKIP  parts to leave out, any of "tests fuzz sanitizers" (default none;
#                     refused under CI=true, where a green run must mean everything ran)
#   FUZZ_SECONDS      per fuzz target (default 20 for ci, 600 for long)
#   Extra arguments go to pytest (e.g. -k flood).
set -uo pipefail
. "$(dirname "$0")/env.sh"
cd "$repo"

export RELIABILITY=${RELIABILITY:-ci}
case "$RELIABILITY" in ci|long) ;; *) echo "reliability.sh: RELIABILITY must be ci or long" >&2; exit 2 ;; esac
export RELIABILITY_OUT=${RELIABILITY_OUT:-$scratch/reliability}
skip=${RELIABILITY_SKIP:-}
if [ -n "$skip" ] && [ "${CI:-}" = "true" ]; then
    echo "reliability.sh: RELIABILITY_SKIP is not allowed with CI=true" >&2
    exit 2
fi
rm -rf "$RELIABILITY_OUT"
mkdir -p "$RELIABILITY_OUT"

declare -A result
order=()
run_part() {  # name command...
    local name=$1 start rc
    shift
    order+=("$name")
    if [[ " $skip " == *" $name "* ]]; then
        result[$name]="skipped (RELIABILITY_SKIP)"
        return
    fi
    start=$(date +%s)
    echo "=== reliability.sh: $name ($RELIABILITY)"
    "$@" 2>&1 | tee "$RELIABILITY_OUT/$name.log"
    rc=${PIPESTATUS[0]}
    result[$name]="$([ "$rc" -eq 0 ] && echo passed || echo "FAILED (exit $rc)") in $(( $(date +%s) - start )) s"
    [ "$rc" -eq 0 ] || failed=1
}

failed=0
t0=$(date +%s)
echo "=== reliability.sh: building ($scratch)"
if ! swift build --scratch-path "$scratch"; then
    echo "reliability.sh: build failed" >&2
    exit 1
fi

run_part tests "$python" -m pytest Tests/reliability -s -ra -p no:cacheprovider "$@"
if [ -x scripts/fuzz.sh ]; then
    export FUZZ_SECONDS=${FUZZ_SECONDS:-$([ "$RELIABILITY" = long ] && echo 600 || echo 20)}
    run_part fuzz scripts/fuzz.sh
fi
if [ -x scripts/sanitizers.sh ]; then
    run_part sanitizers scripts/sanitizers.sh
fi

echo
echo "=== reliability figures ($RELIABILITY, $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ))"
"$python" - "$RELIABILITY_OUT/figures.jsonl" <<'EOF'
import json, sys
rows = []
try:
    with open(sys.argv[1]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
except FileNotFoundError:
    pass
def show(v):
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, dict):
        return ", ".join(f"{k.rsplit('.', 1)[-1]} {n}" for k, n in v.items()) or "none"
    return str(v)
table = [("item", "figure", "value", "limit", "")]
for r in rows:
    value = show(r["value"]) + (f" {r['unit']}" if r.get("unit") else "")
    verdict = "" if "ok" not in r else ("ok" if r["ok"] else "FAIL")
    table.append((r["test"], r["figure"], value, show(r.get("limit", "")), verdict))
widths = [min(60, max(len(row[i]) for row in table)) for i in range(5)]
for row in table:
    print("  ".join(cell[:120].ljust(w) for cell, w in zip(row, widths)).rstrip())
bad = [r for r in rows if r.get("ok") is False]
print(f"\n{len(rows)} figures, {len(bad)} over their limit")
EOF
echo
for name in "${order[@]}"; do
    printf '  %-11s %s\n' "$name" "${result[$name]}"
done
echo "  total       $(( $(date +%s) - t0 )) s; figures in $RELIABILITY_OUT/figures.jsonl"
if [ "$failed" -ne 0 ]; then
    echo "reliability.sh: FAILED" >&2
    exit 1
fi
echo "reliability.sh: all parts passed"
