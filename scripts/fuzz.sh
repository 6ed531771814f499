#!/bin/bash
# Decoder fuzzing (issue 6 item 1): builds the libFuzzer targets of Fuzz/ with
# -sanitize=fuzzer,address (a package of its own, scratch path .build-fuzz, so the main
# build is untouched), replays every seed of Fuzz/corpus/<target>/ in full, then fuzzes
# each target for FUZZ_SECONDS. Fails on any crash, trap, leak, timeout or out-of-memory.
#
#   FUZZ_SECONDS   fuzzing time per target (default 30; a release run uses 600 or more)
#   FUZZ_TARGETS   space-separated subset, e.g. "proxy-reply key-usage" (default: all)
#   FUZZ_OUT       where new corpus entries, crash artifacts and logs go
#                  (default .build-fuzz/out; `cp` interesting new inputs into Fuzz/corpus)
#   FUZZ_JOBS      targets fuzzed at once (default 1; the budget is per target either way)
#   RELIABILITY_OUT  if set, one JSON figure per line is appended to figures.jsonl there
set -euo pipefail
. "$(dirname "$0")/env.sh"
cd "$repo"

seconds=${FUZZ_SECONDS:-30}
scratch_fuzz=${FUZZ_SCRATCH:-$repo/.build-fuzz}
out=${FUZZ_OUT:-$scratch_fuzz/out}
jobs=${FUZZ_JOBS:-1}
# corpus directory name → executable
declare -A binary=(
    [dbus-message]=FuzzDBusMessage
    [service-arguments]=FuzzServiceArguments
    [configuration]=FuzzConfiguration
    [key-usage]=FuzzKeyUsage
    [proxy-reply]=FuzzProxyReply
    [proxy-arguments]=FuzzProxyArguments
    [cryptoki-wire]=FuzzCryptokiWire
)
targets=${FUZZ_TARGETS:-"dbus-message service-arguments configuration key-usage proxy-reply proxy-arguments cryptoki-wire"}

start=$(date +%s)
echo "fuzz.sh: building Fuzz/ (-sanitize=fuzzer,address) in $scratch_fuzz"
# ld.gold warns once per ASan symbol it cannot re-export; that is noise, not a problem.
# Release (optimised, overflow checks kept) runs ~10x more inputs per second than debug;
# -enable-testing lets the targets reach internal decoders through @testable import.
swift build -c release --package-path Fuzz --scratch-path "$scratch_fuzz" \
    -Xswiftc -sanitize=fuzzer,address -Xswiftc -enable-testing 2>&1 \
    | grep -v -e "Cannot export local symbol" -e "prohibited flag(s): -pthread" || true
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "fuzz.sh: build failed" >&2; exit 1; }
build_seconds=$(( $(date +%s) - start ))
bin=$scratch_fuzz/release

rm -rf "$out"
mkdir -p "$out"
# Leaks are checked per input by libFuzzer; halt at the first report of any kind.
# Swift's own crash handler would only add a second, confusing report to libFuzzer's.
export SWIFT_BACKTRACE=enable=no
export ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:detect_leaks=1:abort_on_error=0:allocator_may_return_null=1}
# Fuzz/lsan.supp: the call table's one-time globals, which LeakSanitizer cannot follow.
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$repo/Fuzz/lsan.supp:print_suppressions=0}

figure() {  # test figure value unit [ok]
    [ -n "${RELIABILITY_OUT:-}" ] || return 0
    mkdir -p "$RELIABILITY_OUT"
    /usr/bin/python3 - "$@" >>"$RELIABILITY_OUT/figures.jsonl" <<'PY'
import json, sys, time
test, name, value, unit = sys.argv[1:5]
entry = {"test": test, "figure": name, "value": float(value) if "." in value else int(value), "unit": unit,
         "size": "long" if int(__import__("os").environ.get("FUZZ_SECONDS", "30")) > 60 else "ci", "time": time.time()}
if len(sys.argv) > 5:
    entry["ok"] = sys.argv[5] == "ok"
    entry["limit"] = 0
print(json.dumps(entry))
PY
}

run_target() {  # name → writes $out/<name>.result
    local name=$1 exe=$bin/${binary[$1]} seeds=$repo/Fuzz/corpus/$1
    local work=$out/$1 log=$out/$1.log replay=$out/$1.replay.log status=ok
    mkdir -p "$work"
    # 1. Every seed in full (the fuzzing run below may truncate inputs to -max_len).
    if ! "$exe" -runs=0 -max_len=$((4 << 20)) -rss_limit_mb=4096 -timeout=60 \
            -artifact_prefix="$out/$1-replay-" $(find "$seeds" -type f | sort) >"$replay" 2>&1; then
        status=replay-failed
    fi
    # 2. Fuzzing, new inputs into $work, seeds read from the repository.
    if [ $status = ok ] && ! "$exe" "$work" "$seeds" -max_total_time="$seconds" -max_len=131072 -timeout=10 \
            -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$out/$1-" >"$log" 2>&1; then
        status=failed
    fi
    local execs cov ft speed
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" 2>/dev/null | grep -o '[0-9]*$' || echo 0)
    speed=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" 2>/dev/null | grep -o '[0-9]*$' || echo 0)
    cov=$(grep -o 'cov: [0-9]*' "$log" 2>/dev/null | tail -1 | grep -o '[0-9]*' || echo 0)
    ft=$(grep -o 'ft: [0-9]*' "$log" 2>/dev/null | tail -1 | grep -o '[0-9]*' || echo 0)
    echo "$name ${execs:-0} ${speed:-0} ${cov:-0} ${ft:-0} $(find "$work" -type f | wc -l) $(find "$seeds" -type f | wc -l) $status" \
        >"$out/$name.result"
}

echo "fuzz.sh: $seconds s per target: $targets"
running=0
for t in $targets; do
    [ -n "${binary[$t]:-}" ] || { echo "fuzz.sh: unknown target '$t'" >&2; exit 2; }
    run_target "$t" &
    running=$((running + 1))
    if [ $running -ge "$jobs" ]; then wait -n || true; running=$((running - 1)); fi
done
wait

failed=0
printf '\n%-18s %12s %9s %7s %8s %8s %6s  %s\n' target execs exec/s cov features new seeds result
for t in $targets; do
    read -r name execs speed cov ft new nseeds status <"$out/$t.result"
    printf '%-18s %12s %9s %7s %8s %8s %6s  %s\n' "$name" "$execs" "$speed" "$cov" "$ft" "$new" "$nseeds" "$status"
    figure fuzz "$name: executions" "$execs" execs
    figure fuzz "$name: coverage (edges)" "$cov" edges
    figure fuzz "$name: crashes, traps, leaks" "$([ "$status" = ok ] && echo 0 || echo 1)" findings "$([ "$status" = ok ] && echo ok || echo fail)"
    if [ "$status" != ok ]; then
        failed=1
        echo "--- $t: $status; log tail ($out/$t.log, $out/$t.replay.log):" >&2
        tail -n 40 "$out/$t.replay.log" "$out/$t.log" 2>/dev/null >&2 || true
        ls "$out" | grep -e "^$t-" >&2 || true
    fi
done
total=$(( $(date +%s) - start ))
echo "fuzz.sh: build ${build_seconds}s, total ${total}s"
if [ $failed -ne 0 ]; then
    echo "fuzz.sh: FAILED (artifacts in $out)" >&2
    exit 1
fi
echo "fuzz.sh: 0 crashes, 0 traps, 0 leaks"
