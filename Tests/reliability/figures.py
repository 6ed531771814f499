"""Figures of the reliability tests: printed (run pytest with -s to see them) and, when
RELIABILITY_OUT is set, appended as one JSON object per line to $RELIABILITY_OUT/figures.jsonl,
which scripts/reliability.sh turns into a table."""

import json
import os
import time
from pathlib import Path

SIZE = os.environ.get("RELIABILITY", "ci").lower()
if SIZE not in ("ci", "long"):
    raise RuntimeError(f"RELIABILITY must be ci or long, not {SIZE!r}")
LONG = SIZE == "long"


def sized(ci, long):
    """The value for the current RELIABILITY size."""
    return long if LONG else ci


def record(test, name, value, unit="", limit=None, ok=None):
    """One figure: test item, what, value, unit, the limit it is held to and whether it met it."""
    entry = {"test": test, "figure": name, "value": value, "unit": unit, "size": SIZE}
    if limit is not None:
        entry["limit"] = limit
    if ok is not None:
        entry["ok"] = bool(ok)
    shown = f"{value:.2f}" if isinstance(value, float) else str(value)
    extra = f"  (limit {limit}{' ' + unit if unit else ''}: {'ok' if ok else 'FAIL'})" if limit is not None else ""
    print(f"FIGURE {test}: {name} = {shown}{' ' + unit if unit else ''}{extra}", flush=True)
    out = os.environ.get("RELIABILITY_OUT")
    if out:
        entry["time"] = time.time()
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / "figures.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")


def percentile(values, p):
    """Nearest-rank percentile of a non-empty list (p in 0..100)."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


# --- the daemon process, as /proc shows it ---------------------------------------

def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def fd_targets(pid):
    """What each open fd of pid points at (for failure messages)."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return out
