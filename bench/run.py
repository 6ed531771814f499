#!/usr/bin/python3
"""Signature benchmark: one SoftHSM token, four ways to reach it.

Configurations, all on the same token store made afresh in a temp dir:
  direct        libsofthsm2.so loaded in the benchmark process
  p11-kit       `p11-kit server` on a unix socket + p11-kit-client.so
  proxy-nocache libpincache-pkcs11.so -> pincached (P11_EnableCachePIN=0) on a private bus
  proxy-cache   the same with P11_EnableCachePIN=1 (LoginLinger at its default, 50 ms)
  proxy-cache-nolinger  the same with LoginLinger=0: every signature a bracket of its own
Each is measured for ECDSA P-256 and RSA-2048, in steady state (C_SignInit+C_Sign in a
logged-in session) and as a cold open-login-find-sign-logout-close cycle; `direct` also as
a login-find-sign-logout cycle in an open session (what a caching-mode signature costs the
token). Then, issue 14's figures: 1/4/16/64 concurrent client processes (throughput, p99)
through p11-kit and the proxy in both modes, and `p11tool --test-sign` wall time directly and
through the proxy in caching mode, with the backend logins it cost. Then issue 13 §10's:
multi-part operations streamed in 1 MiB parts (Tests/integration/test_proxy_host.c
`bigstream`: AES-CTR encryption, encryption and decryption side by side, SHA-256, HMAC and
its verification), wall time and MiB/s in every configuration. bench/p11bench.c does the
signature timing; this script builds it, sets everything up, prints one table with ratios to
direct and to p11-kit, and tears everything down.

Usage: bench/run.py [--quick] [--only NAME,...] [--json FILE] [--keep] ...
       (see --help; `make bench BENCH_ARGS=--quick`)
Environment: PINCACHE_SCRATCH (SwiftPM scratch path, default <repo>/.build),
             PINCACHE_BENCH_BUILD_DIR (use pincached and libpincache-pkcs11.so from there,
             no build), CI=true (a configuration that cannot run is an error).
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
P11KIT_CLIENT = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
TOKEN = "pincache-demo"
PIN = "123456"
SO_PIN = "12345678"
KEYS = {"ecdsa": "01", "rsa": "02"}  # CKA_IDs written by scripts/make-demo-token.sh
MECH_TITLE = {"ecdsa": "ECDSA P-256", "rsa": "RSA-2048"}
CONFIGS = ("direct", "p11-kit", "proxy-nocache", "proxy-cache", "proxy-cache-nolinger")
READY_TIMEOUT = 20.0
RUN_TIMEOUT = 900
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>pincache-bench</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


class Unavailable(Exception):
    """A configuration cannot run here (reason in the message)."""


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def wait_for(pred, what, proc=None, timeout=READY_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not ready after {timeout:.0f} s")


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- setup ----------------------------------------------------------------------

def compile_bench(tmp):
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise SystemExit("bench: no C compiler (cc) found")
    cflags = subprocess.run(["pkg-config", "--cflags", "p11-kit-1"], capture_output=True,
                            text=True).stdout.split() or ["-I/usr/include/p11-kit-1"]
    exe = tmp / "p11bench"
    subprocess.run([cc, "-O2", "-std=c11", "-Wall", "-Wextra", *cflags, "-o", str(exe),
                    str(REPO / "bench" / "p11bench.c"), "-ldl"], check=True)
    return exe


def make_token(tmp):
    for tool in ("softhsm2-util", "pkcs11-tool", "openssl"):
        if not shutil.which(tool):
            raise SystemExit(f"bench: {tool} not installed (make deps)")
    store = tmp / "softhsm"
    env = {**os.environ, "PINCACHE_DEMO_PIN": PIN, "PINCACHE_DEMO_SO_PIN": SO_PIN}
    subprocess.run([str(REPO / "scripts" / "make-demo-token.sh"), str(store), TOKEN], check=True,
                   stdout=subprocess.DEVNULL, env=env)
    return store / "softhsm2.conf"


def swift_build_dir(args):
    """Where pincached and libpincache-pkcs11.so are, building them if needed.

    Raises Unavailable when the proxy product does not exist yet or fails to build."""
    if args.build_dir:
        d = Path(args.build_dir)
    else:
        pkg = (REPO / "Package.swift").read_text()
        if '"pincache-pkcs11"' not in pkg:
            raise Unavailable("product pincache-pkcs11 is not in Package.swift yet")
        scratch = Path(os.environ.get("PINCACHE_SCRATCH") or REPO / ".build")
        swift = shutil.which("swift") or "/opt/swift/usr/bin/swift"
        for product in ("pincached", "pincache-pkcs11"):
            log(f"building {product} ({args.config}) in {scratch}")
            r = subprocess.run([swift, "build", "-c", args.config, "--scratch-path", str(scratch),
                                "--product", product], cwd=REPO, stdout=subprocess.DEVNULL)
            if r.returncode != 0:
                raise Unavailable(f"swift build --product {product} failed ({r.returncode})")
        d = scratch / args.config
    for f in ("pincached", "libpincache-pkcs11.so"):
        if not (d / f).exists():
            raise Unavailable(f"{d / f} does not exist")
    return d


# --- configurations -------------------------------------------------------------
# Each is a context manager yielding (module path, extra environment) with its
# service running, and stopping the service on exit.

@contextmanager
def direct(ctx, rnd):
    yield SOFTHSM_MODULE, {}


@contextmanager
def p11kit(ctx, rnd):
    if not shutil.which("p11-kit") or not os.path.exists(P11KIT_CLIENT):
        raise Unavailable("p11-kit / p11-kit-modules not installed")
    d = ctx["tmp"] / "p11-kit" / str(rnd + 1)
    d.mkdir(parents=True)
    sock = d / "server.sock"
    err = open(d / "server.stderr", "wb")
    proc = subprocess.Popen(["p11-kit", "server", "--foreground", "--provider", SOFTHSM_MODULE,
                             "--name", str(sock), f"pkcs11:token={TOKEN}"],
                            stdout=subprocess.DEVNULL, stderr=err, env=ctx["env"])
    try:
        wait_for(sock.exists, "p11-kit server", proc)
        yield P11KIT_CLIENT, {"P11_KIT_SERVER_ADDRESS": f"unix:path={sock}"}
    finally:
        stop(proc)
        err.close()


def proxy(caching, linger=None):
    @contextmanager
    def start(ctx, rnd):
        build = ctx["build"]
        if isinstance(build, Unavailable):
            raise build
        for tool in ("dbus-daemon", "gdbus"):
            if not shutil.which(tool):
                raise Unavailable(f"{tool} not installed")
        d = ctx["tmp"] / ("proxy-cache" if caching else "proxy-nocache") / f"{linger}-{rnd + 1}"
        d.mkdir(parents=True)
        sock = d / "bus.sock"
        (d / "bus.conf").write_text(BUS_CONFIG.format(socket=sock))
        procs, logs = [], []
        try:
            logs.append(open(d / "bus.stderr", "wb"))
            bus = subprocess.Popen(["dbus-daemon", f"--config-file={d / 'bus.conf'}", "--nofork",
                                    "--nopidfile", "--print-address=1"], stdout=subprocess.PIPE,
                                   stderr=logs[-1], text=True)
            procs.append(bus)
            address = bus.stdout.readline().strip()
            if not address:
                raise RuntimeError("dbus-daemon did not start: " + (d / "bus.stderr").read_text())
            # LogoutAfterSign and force-login stay off: they would measure policy, not transport.
            (d / "pincache.cfg").write_text(
                f"P11_EnableCachePIN={1 if caching else 0}\n"
                "P11_LogoutAfterSign=0\n"
                "ForceLoginBeforeSignKeyUsage=0\n"
                + ("" if linger is None else f"LoginLinger={linger}\n")
                + f"Module={SOFTHSM_MODULE}\n")
            logs.append(open(d / "pincached.stderr", "wb"))
            daemon = subprocess.Popen([str(build / "pincached"), "--bus", address, "--config",
                                       str(d / "pincache.cfg")],
                                      stdout=subprocess.DEVNULL, stderr=logs[-1], env=ctx["env"])
            procs.append(daemon)
            wait_for(lambda: name_has_owner(address, "org.pincache.Daemon"), "pincached", daemon)
            yield str(build / "libpincache-pkcs11.so"), {"PINCACHE_BUS_ADDRESS": address}
        finally:
            for p in reversed(procs):
                stop(p)
                if p.stdout:
                    p.stdout.close()
            for f in logs:
                f.close()
    return start


def name_has_owner(address, name):
    r = subprocess.run(["gdbus", "call", "--address", address, "--dest", "org.freedesktop.DBus",
                        "--object-path", "/org/freedesktop/DBus",
                        "--method", "org.freedesktop.DBus.NameHasOwner", name],
                       capture_output=True, text=True)
    return r.returncode == 0 and "true" in r.stdout


STARTERS = {"direct": direct, "p11-kit": p11kit, "proxy-nocache": proxy(False),
            "proxy-cache": proxy(True), "proxy-cache-nolinger": proxy(True, linger=0)}


# --- measuring ------------------------------------------------------------------

RESULT_RE = re.compile(r"^RESULT (.*)$", re.M)


def run_one(ctx, name, module, extra_env, mech, mode, count, warmup):
    env = {**ctx["env"], **extra_env, "P11BENCH_PIN": PIN}
    return parse_result(subprocess.run(bench_cmd(ctx, name, module, mech, mode, count, warmup),
                                       capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT),
                        name, mech, mode)


def bench_cmd(ctx, name, module, mech, mode, count, warmup):
    return [str(ctx["exe"]), "--module", module, "--token", TOKEN, "--key-id", KEYS[mech],
            "--mech", mech, "--mode", mode, "--count", str(count), "--warmup", str(warmup),
            "--name", name] + (["--length-query"] if ctx["length_query"] else [])


def parse_result(r, name, mech, mode):
    m = RESULT_RE.search(r.stdout)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"p11bench {name} {mech} {mode} failed ({r.returncode}): "
                           + r.stderr.strip())
    out = {}
    for kv in m.group(1).split():
        k, v = kv.split("=", 1)
        out[k] = v if k in ("name", "mech", "mode", "library") else float(v)
    return out


def measure(ctx, args, name, rnd, rounds):
    """One round of one configuration: its service up, four measurements, service down."""
    with STARTERS[name](ctx, rnd) as (module, extra):
        for mode in ("steady", "cold"):
            for mech in ("ecdsa", "rsa"):
                n, w = counts(args, mech, mode)
                log(f"round {rnd + 1}/{args.rounds} {name}: {mech} {mode} x{n}")
                rounds.setdefault((name, mech, mode), []).append(
                    run_one(ctx, name, module, extra, mech, mode, n, w))
        if name == "direct":
            n, w = counts(args, "ecdsa", "cold")
            log(f"round {rnd + 1}/{args.rounds} {name}: ecdsa cycle x{n}")
            rounds.setdefault((name, "ecdsa", "cycle"), []).append(
                run_one(ctx, name, module, extra, "ecdsa", "cycle", n, w))


# --- issue 14: concurrent clients, p11tool --test-sign ----------------------------

CONCURRENT = ("p11-kit", "proxy-nocache", "proxy-cache")


def run_clients(ctx, name, module, extra_env, clients, per_client, attempt=0):
    """`clients` p11bench processes signing ECDSA at once (steady: each logged in once).
    They log in and warm up, then a barrier file starts every measured loop together.
    Returns throughput over the common wall time and p50/p99 over every sample."""
    d = ctx["tmp"] / "clients" / f"{name}-{clients}-{attempt}"
    d.mkdir(parents=True)
    barrier = d / "go"
    procs = []
    for i in range(clients):
        env = {**ctx["env"], **extra_env, "P11BENCH_PIN": PIN, "P11BENCH_BARRIER": str(barrier),
               "P11BENCH_SAMPLES": str(d / f"{i}.samples")}
        procs.append(subprocess.Popen(bench_cmd(ctx, name, module, "ecdsa", "steady", per_client, 5),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        time.sleep(0.02)  # p11-kit's server has been seen to drop a connection in a burst of 64
    # Everyone is logged in and warmed up when its warm-up signatures are done; there is no
    # signal for it, so wait a fixed time that covers 64 process starts on 2 CPUs.
    time.sleep(1.0 + 0.1 * clients)
    barrier.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=RUN_TIMEOUT)
        results.append(parse_result(subprocess.CompletedProcess(p.args, p.returncode, out, err),
                                    name, "ecdsa", "steady"))
    samples = sorted(float(x) for i in range(clients) for x in (d / f"{i}.samples").read_text().split())
    wall = max(r["end_us"] for r in results) - min(r["start_us"] for r in results)

    def pct(p):
        return samples[min(len(samples) - 1, max(0, int(p / 100 * len(samples) + 0.999999) - 1))]
    return {"name": name, "clients": clients, "n": len(samples), "ops_per_s": len(samples) / (wall / 1e6),
            "p50_us": pct(50), "p99_us": pct(99), "max_us": samples[-1]}


def statistics(address):
    """Manager1.GetStatistics's BackendLogins on the daemon at `address`, or None."""
    r = subprocess.run(["gdbus", "call", "--address", address, "--dest", "org.pincache.Daemon",
                        "--object-path", "/org/pincache", "--method", "org.pincache.Manager1.GetStatistics"],
                       capture_output=True, text=True)
    m = re.search(r"'BackendLogins': <uint64 (\d+)>", r.stdout)
    return int(m.group(1)) if m else None


def p11tool_runs(ctx, name, module, extra_env, runs):
    """Median wall time of `p11tool --login --test-sign` on the EC key, and (proxy) the
    backend logins one run cost."""
    url = f"pkcs11:token={TOKEN};id=%{KEYS['ecdsa']};type=private"
    env = {**ctx["env"], **extra_env}
    address = extra_env.get("PINCACHE_BUS_ADDRESS")
    before = statistics(address) if address else None
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        r = subprocess.run(["p11tool", "--provider", module, "--login", f"--set-pin={PIN}", "--test-sign", url],
                           capture_output=True, text=True, env=env, timeout=120)
        times.append(time.perf_counter() - t)
        if r.returncode != 0 or "Verifying against public key in the token... ok" not in r.stdout + r.stderr:
            raise RuntimeError(f"p11tool --test-sign through {name} failed: {r.stdout}{r.stderr}")
    times.sort()
    logins = None
    if address:
        after = statistics(address)
        logins = (after - before) / runs if before is not None and after is not None else None
    return {"name": name, "runs": runs, "median_ms": times[(runs - 1) // 2] * 1000, "logins_per_run": logins}


def measure_issue14(ctx, args, skipped):
    """Concurrency and p11tool figures, each configuration's service up once."""
    conc, tool = [], []
    have_p11tool = shutil.which("p11tool") is not None
    for name in ("direct",) + CONCURRENT:
        if name not in args.only or name in skipped:
            continue
        wants_tool = have_p11tool and args.p11tool_runs > 0 and name in ("direct", "proxy-cache")
        if not wants_tool and (name == "direct" or not args.clients):
            continue
        with STARTERS[name](ctx, args.rounds) as (module, extra):
            if name in CONCURRENT:
                for n in args.clients:
                    if name == "proxy-nocache" and n > 1:
                        # Non-caching mode is an exclusive login: a second process's C_Login
                        # gets CKR_USER_ANOTHER_ALREADY_LOGGED_IN until the first logs out.
                        conc.append({"name": name, "clients": n, "na": "exclusive login (one client at a time)"})
                        continue
                    per = max(args.min_per_client, args.clients_total // n)
                    for attempt in range(3):
                        log(f"{name}: {n} concurrent clients x{per} ECDSA")
                        try:
                            conc.append(run_clients(ctx, name, module, extra, n, per, attempt))
                            break
                        except RuntimeError as e:
                            # p11-kit's server has been seen to answer a client of a burst of 64
                            # with no slots at all: the measurement is taken again.
                            if attempt == 2:
                                raise
                            log(f"{name}: {n} clients: {e}; again")
            if wants_tool:
                log(f"{name}: p11tool --test-sign x{args.p11tool_runs}")
                tool.append(p11tool_runs(ctx, name, module, extra, args.p11tool_runs))
    return conc, tool


def compile_host(tmp):
    cc = shutil.which("cc") or shutil.which("gcc")
    cflags = subprocess.run(["pkg-config", "--cflags", "p11-kit-1"], capture_output=True,
                            text=True).stdout.split() or ["-I/usr/include/p11-kit-1"]
    exe = tmp / "proxy_host"
    subprocess.run([cc, "-O2", *cflags, "-o", str(exe), str(REPO / "Tests" / "integration" / "test_proxy_host.c"),
                    "-ldl", "-lpthread"], check=True)
    return exe


def measure_streams(ctx, args, skipped):
    """Issue 13 §10: median wall time of `bigstream` (--stream-mib MiB per operation) per
    configuration, its service up once."""
    if args.stream_mib <= 0:
        return []
    host = compile_host(ctx["tmp"])
    out = []
    expected = None  # every configuration must print what the first (direct) printed
    for name in args.only:
        if name in skipped or name == "proxy-cache-nolinger":  # no login in the streams: the same as proxy-cache
            continue
        with STARTERS[name](ctx, args.rounds) as (module, extra):
            log(f"{name}: bigstream {args.stream_mib} MiB x{args.rounds}")
            times = []
            for _ in range(args.rounds):
                t = time.perf_counter()
                r = subprocess.run([str(host), module, "bigstream", TOKEN, PIN, str(args.stream_mib)],
                                   capture_output=True, text=True, env={**ctx["env"], **extra}, timeout=600)
                times.append(time.perf_counter() - t)
                if name == "p11-kit" and "stream encrypt CKR_MECHANISM_INVALID" in r.stdout:
                    break
                if r.returncode != 0 or "stream verify CKR_OK" not in r.stdout or r.stdout != (expected or r.stdout):
                    raise RuntimeError(f"bigstream through {name} failed or differed: {r.stdout}{r.stderr}")
                expected = r.stdout
            else:
                times.sort()
                out.append({"name": name, "mib_per_operation": args.stream_mib, "seconds": times[(len(times) - 1) // 2]})
                continue
            # p11-kit 0.24's remoting has no serialisation for CK_AES_CTR_PARAMS.
            out.append({"name": name, "na": "its remoting refuses AES-CTR's parameter (CKR_MECHANISM_INVALID)"})
    return out


def report_streams(streams):
    if not streams:
        return
    mib = next(r["mib_per_operation"] for r in streams if "na" not in r)
    # Encryption, encryption + decryption, digest, HMAC, verification, and 2 MiB of a tampered one.
    total = 6 * mib + 2
    print(f"\nMulti-part operations streamed in 1 MiB parts (bigstream: {mib} MiB per operation, "
          f"{total} MiB through the token; median wall time, process start included)")
    print(f"{'configuration':<14} {'seconds':>8} {'MiB/s':>8} {'x direct':>9}")
    base = next((r["seconds"] for r in streams if r["name"] == "direct" and "na" not in r), None)
    for r in streams:
        if "na" in r:
            print(f"{r['name']:<14} {'n/a':>8}  {r['na']}")
            continue
        print(f"{r['name']:<14} {r['seconds']:>8.3f} {total / r['seconds']:>8.1f} {ratio(r['seconds'], base):>9}")


def median_round(runs):
    """The run with the median p50, whole, so that its p99 and ops/s stay its own."""
    return sorted(runs, key=lambda r: r["p50_us"])[(len(runs) - 1) // 2]


def counts(args, mech, mode):
    if mode == "steady":
        n = args.ecdsa_count if mech == "ecdsa" else args.rsa_count
    else:
        n = args.cold_ecdsa_count if mech == "ecdsa" else args.cold_rsa_count
    return n, max(5, n // 20)


# --- report ---------------------------------------------------------------------

def machine():
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    def version(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.split("\n")[0].strip()
        except OSError:
            return "?"
    softhsm = version(["dpkg-query", "-W", "-f=${Version}", "softhsm2"])
    p11 = version(["dpkg-query", "-W", "-f=${Version}", "p11-kit"])
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return (f"{cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
            f"SoftHSM {softhsm}, p11-kit {p11}, load average {load}")


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"


def report(results, skipped, args):
    print()
    print(f"Machine: {machine()}")
    print(f"Build: {args.config}; steady N = {args.ecdsa_count} ECDSA / {args.rsa_count} RSA, "
          f"cold N = {args.cold_ecdsa_count} / {args.cold_rsa_count}; median of {args.rounds} "
          f"round(s); times in microseconds")
    head = (f"{'configuration':<20} {'p50':>9} {'p99':>9} {'mean':>9} {'ops/s':>9}"
            f"  {'p50/direct':>10} {'p50/p11-kit':>11} {'ops/direct':>10} {'ops/p11-kit':>11}")
    for mode in ("steady", "cold"):
        for mech in ("ecdsa", "rsa"):
            sign = "C_SignInit+C_Sign(NULL)+C_Sign" if args.length_query else "C_SignInit+C_Sign"
            what = (sign if mode == "steady" else
                    "cold cycle: open, login, find key, sign, logout, close")
            print(f"\n{MECH_TITLE[mech]} — {what}")
            print(head)
            base = results.get(("direct", mech, mode))
            p11 = results.get(("p11-kit", mech, mode))
            for name in CONFIGS:
                if name not in args.only:
                    continue
                r = results.get((name, mech, mode))
                if r is None:
                    print(f"{name:<20} {'n/a':>9}  {skipped.get(name, 'not run')}")
                    continue
                print(f"{name:<20} {r['p50_us']:>9.1f} {r['p99_us']:>9.1f} {r['mean_us']:>9.1f} "
                      f"{r['ops_per_s']:>9.1f}"
                      f"  {ratio(r['p50_us'], base and base['p50_us']):>10}"
                      f" {ratio(r['p50_us'], p11 and p11['p50_us']):>11}"
                      f" {ratio(r['ops_per_s'], base and base['ops_per_s']):>10}"
                      f" {ratio(r['ops_per_s'], p11 and p11['ops_per_s']):>11}")
    libs = {}
    for (name, _, _), r in results.items():
        libs.setdefault(name, r.get("library", "?"))
    if libs:
        print("\nModules (C_GetInfo manufacturerID): "
              + ", ".join(f"{n} = {libs[n]}" for n in CONFIGS if n in libs))
    prox = results.get(("proxy-nocache", "ecdsa", "steady"))
    p11 = results.get(("p11-kit", "ecdsa", "steady"))
    if prox and p11:
        verdict = "MET" if prox["p50_us"] <= p11["p50_us"] else "NOT MET"
        detail = f"{prox['p50_us']:.1f} us vs {p11['p50_us']:.1f} us"
    else:
        verdict, detail = "NOT MEASURED", "needs both proxy-nocache and p11-kit"
    print(f"\nTarget (proxy non-caching ECDSA p50 <= p11-kit ECDSA p50): {verdict} ({detail})")
    cycle = results.get(("direct", "ecdsa", "cycle"))
    cache = results.get(("proxy-cache", "ecdsa", "steady"))
    if cycle:
        print(f"\nDirect login + find + sign + logout cycle (ECDSA, session open): p50 {cycle['p50_us']:.1f}, "
              f"p99 {cycle['p99_us']:.1f}, {cycle['ops_per_s']:.1f} ops/s")
    if cycle and cache:
        r = cache["p50_us"] / cycle["p50_us"]
        print(f"Target (caching-mode sign p50 <= 1.2x the direct cycle): {'MET' if r <= 1.2 else 'NOT MET'} "
              f"({cache['p50_us']:.1f} us vs {cycle['p50_us']:.1f} us = {r:.2f}x)")
    lone = results.get(("proxy-cache-nolinger", "ecdsa", "steady"))
    if cycle and lone:
        r = lone["p50_us"] / cycle["p50_us"]
        print(f"With LoginLinger=0 (a bracket per signature): {lone['p50_us']:.1f} us = {r:.2f}x the direct cycle")


def report_issue14(conc, tool):
    if conc:
        print("\nConcurrent client processes, ECDSA steady (each logged in once; every sample of every "
              "process; ops/s over the common wall time)")
        print(f"{'configuration':<14} {'clients':>7} {'n':>6} {'ops/s':>9} {'p50':>9} {'p99':>9} {'max':>9} "
              f"{'ops/p11-kit':>11}")
        p11 = {r["clients"]: r for r in conc if r["name"] == "p11-kit" and "na" not in r}
        for r in conc:
            if "na" in r:
                print(f"{r['name']:<14} {r['clients']:>7} {'n/a':>6}  {r['na']}")
                continue
            base = p11.get(r["clients"])
            print(f"{r['name']:<14} {r['clients']:>7} {r['n']:>6} {r['ops_per_s']:>9.1f} {r['p50_us']:>9.1f} "
                  f"{r['p99_us']:>9.1f} {r['max_us']:>9.1f} {ratio(r['ops_per_s'], base and base['ops_per_s']):>11}")
        cache = {r["clients"]: r for r in conc if r["name"] == "proxy-cache" and "na" not in r}
        if 16 in cache and 16 in p11:
            x = cache[16]["ops_per_s"] / p11[16]["ops_per_s"]
            print(f"Target (16 caching clients >= 0.3x p11-kit's throughput): {'MET' if x >= 0.3 else 'NOT MET'} "
                  f"({x:.2f}x)")
        if 64 in cache:
            p99 = cache[64]["p99_us"] / 1000
            print(f"Target (caching p99 at 64 clients <= 50 ms): {'MET' if p99 <= 50 else 'NOT MET'} ({p99:.1f} ms)")
    if tool:
        print("\np11tool --login --test-sign (EC key; a process per run: load, login, find, sign, verify twice)")
        for r in tool:
            logins = "" if r["logins_per_run"] is None else f", {r['logins_per_run']:.1f} backend logins per run"
            print(f"{r['name']:<14} median {r['median_ms']:.1f} ms over {r['runs']} runs{logins}")
        t = {r["name"]: r for r in tool}
        if "direct" in t and "proxy-cache" in t:
            x = t["proxy-cache"]["median_ms"] / t["direct"]["median_ms"]
            print(f"Target (through the proxy in caching mode <= 2x direct): {'MET' if x <= 2 else 'NOT MET'} ({x:.2f}x)")


# --- main -----------------------------------------------------------------------

def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CI-sized run (200/50 steady, 20/10 cold signatures)")
    p.add_argument("--ecdsa-count", type=int)
    p.add_argument("--rsa-count", type=int)
    p.add_argument("--cold-ecdsa-count", type=int)
    p.add_argument("--cold-rsa-count", type=int)
    p.add_argument("--rounds", type=int,
                   help="measure everything this many times, report the median (default 3, --quick 1)")
    p.add_argument("--only", default=",".join(CONFIGS),
                   help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--config", choices=("release", "debug"), default="release",
                   help="SwiftPM configuration for pincached and the proxy (default release)")
    p.add_argument("--build-dir", default=os.environ.get("PINCACHE_BENCH_BUILD_DIR"),
                   help="take pincached and libpincache-pkcs11.so from here, do not build")
    p.add_argument("--length-query", action="store_true",
                   help="sign as pkcs11-tool does: C_Sign(NULL) for the length, then C_Sign")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs) afterwards")
    p.add_argument("--clients", help="concurrent client counts (default 1,4,16,64; --quick 1,4; 0 = none)")
    p.add_argument("--clients-total", type=int,
                   help="signatures per concurrency measurement, split over the clients (default 2000, --quick 200)")
    p.add_argument("--min-per-client", type=int, help="at least this many per client (default 50, --quick 20)")
    p.add_argument("--p11tool-runs", type=int, help="p11tool --test-sign runs (default 10, --quick 3; 0 = none)")
    p.add_argument("--stream-mib", type=int,
                   help="MiB per operation in the streamed multi-part figures (default 64, --quick 8; 0 = none)")
    p.add_argument("--strict", action="store_true", default=CI,
                   help="a configuration that cannot run is an error (default under CI=true)")
    a = p.parse_args()
    defaults = (200, 50, 20, 10) if a.quick else (2000, 500, 200, 100)
    for attr, d in zip(("ecdsa_count", "rsa_count", "cold_ecdsa_count", "cold_rsa_count"), defaults):
        if getattr(a, attr) is None:
            setattr(a, attr, d)
        if getattr(a, attr) < 1:
            p.error(f"--{attr.replace('_', '-')} must be at least 1")
    if a.rounds is None:
        a.rounds = 1 if a.quick else 3
    if a.clients is None:
        a.clients = "1,4" if a.quick else "1,4,16,64"
    a.clients = [int(c) for c in a.clients.split(",") if c.strip() and int(c) > 0]
    if a.clients_total is None:
        a.clients_total = 200 if a.quick else 2000
    if a.min_per_client is None:
        a.min_per_client = 20 if a.quick else 50
    if a.p11tool_runs is None:
        a.p11tool_runs = 3 if a.quick else 10
    if a.stream_mib is None:
        a.stream_mib = 8 if a.quick else 64
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    a.only = [c.strip() for c in a.only.split(",") if c.strip()]
    for c in a.only:
        if c not in CONFIGS:
            p.error(f"unknown configuration {c!r}")
    return a


def main():
    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pincache-bench-"))
    failed = False
    try:
        exe = compile_bench(tmp)
        conf = make_token(tmp)
        ctx = {"tmp": tmp, "exe": exe, "length_query": args.length_query,
               "env": {**os.environ, "SOFTHSM2_CONF": str(conf)}}
        if any(c.startswith("proxy") for c in args.only):
            try:
                ctx["build"] = swift_build_dir(args)
            except Unavailable as e:
                ctx["build"] = e
        rounds, skipped = {}, {}
        # Rounds go round all configurations, so that load from elsewhere drifting over
        # the run hits every configuration alike; the median round is reported.
        for rnd in range(args.rounds):
            for name in args.only:
                if name in skipped:
                    continue
                try:
                    measure(ctx, args, name, rnd, rounds)
                except Unavailable as e:
                    skipped[name] = f"skipped: {e}"
                    log(f"{name}: skipped: {e}")
                    failed = failed or args.strict
                except (RuntimeError, subprocess.SubprocessError) as e:
                    skipped[name] = "FAILED (see above)"
                    log(f"{name}: FAILED: {e}")
                    for f in sorted((tmp / name).glob("*/*.stderr")):
                        tail = f.read_text(errors="replace").strip().splitlines()[-20:]
                        log(f"{f.name}:" + "".join("\n  | " + t for t in tail))
                    failed = True
        results = {k: median_round(v) for k, v in rounds.items() if k[0] not in skipped}
        report(results, skipped, args)
        conc, tool = [], []
        try:
            conc, tool = measure_issue14(ctx, args, skipped)
        except (RuntimeError, subprocess.SubprocessError) as e:
            log(f"issue 14 figures: FAILED: {e}")
            failed = True
        report_issue14(conc, tool)
        streams = []
        try:
            streams = measure_streams(ctx, args, skipped)
        except (RuntimeError, subprocess.SubprocessError) as e:
            log(f"stream figures: FAILED: {e}")
            failed = True
        report_streams(streams)
        if args.json:
            doc = {"machine": machine(), "build": args.config, "rounds": args.rounds,
                   "length_query": args.length_query,
                   "results": list(results.values()),
                   "all_rounds": [r for v in rounds.values() for r in v], "skipped": skipped,
                   "concurrent": conc, "p11tool": tool, "streams": streams}
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
