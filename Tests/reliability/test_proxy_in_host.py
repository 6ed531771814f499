"""Issue 6 item 9: the proxy inside a host process (plain C programs that dlopen
libpincache-pkcs11.so):

- the daemon killed (SIGKILL), then the bus itself restarted: the host lives on, every
  call answers a defined CKR_* code within its deadline, and the host recovers (new
  sessions sign) without re-initialising;
- a forked child that does not call C_Initialize gets CKR_CRYPTOKI_NOT_INITIALIZED from
  everything, and the parent is unaffected;
- a setuid-root binary run by an unprivileged user ignores PINCACHE_BUS_ADDRESS
  (secure_getenv), while the same binary without the setuid bit obeys it.
"""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hygiene_support import (  # noqa: F401 (fixtures)
    REPO, Host, PublicBus, bus, build_dir, figure, need, pincached_bin, proxy_host, proxy_lib, secret_store,
    start, unprivileged_user, wait_until, world_readable_tmp)
from pincache_client import digest

ITEM = 9
LABEL = "pincache-demo"
HERE = Path(__file__).resolve().parent
# What a host may see while the daemon or the bus is away (dbus/README.md "Errors").
DEFINED = {"CKR_OK", "CKR_DEVICE_REMOVED", "CKR_SESSION_HANDLE_INVALID", "CKR_TOKEN_NOT_PRESENT",
           "CKR_SLOT_ID_INVALID", "CKR_DEVICE_ERROR", "CKR_USER_NOT_LOGGED_IN"}
DEADLINE = 31.0   # the proxy's default reply timeout (Wire.defaultTimeout, 30 s) plus slack
CKR_CRYPTOKI_NOT_INITIALIZED = 0x190


@pytest.fixture(scope="session")
def hygiene_host(tmp_path_factory):
    need(shutil.which("cc"), "no C compiler (cc)")
    cflags = subprocess.run(["pkg-config", "--cflags", "p11-kit-1"], capture_output=True, text=True)
    need(cflags.returncode == 0, "p11-kit-1 development files missing (libp11-kit-dev)")
    exe = tmp_path_factory.mktemp("hygiene-host") / "hygiene_host"
    subprocess.run(["cc", "-Wall", "-Werror", "-O1", "-o", str(exe), str(HERE / "hygiene_host.c"),
                    *cflags.stdout.split(), "-ldl"], check=True)
    return exe


class TimedHost:
    """Host (test_proxy_host.c repl) whose every call is timed and checked for a defined code."""

    def __init__(self, host):
        self.host = host
        self.codes = {}
        self.slowest = 0.0

    def __call__(self, command, phase):
        t0 = time.monotonic()
        rv, rest = self.host(command)
        took = time.monotonic() - t0
        self.slowest = max(self.slowest, took)
        assert self.host.proc.poll() is None, f"the host died on '{command}'"
        assert took < DEADLINE, f"'{command}' blocked {took:.1f}s ({phase})"
        assert rv in DEFINED, f"'{command}' during {phase}: undefined code {rv} {rest}"
        self.codes.setdefault(phase, set()).add(rv)
        return rv, rest

    def recover(self, phase, timeout=30.0):
        """Opens a session, logs in and signs, retrying until the daemon answers."""
        deadline = time.monotonic() + timeout
        while True:
            rv, s = self("open", phase)
            if rv == "CKR_OK":
                break
            assert time.monotonic() < deadline, f"no session within {timeout}s after {phase}: {rv}"
            time.sleep(0.2)
        return s


def test_host_survives_daemon_kill_and_bus_restart(start, bus, proxy_host, proxy_lib, secret_store):
    _, pin, _ = secret_store
    d = start(caching=True)
    # No guid in the address: the restarted bus has a new one, and the host must find it.
    env = {"PINCACHE_BUS_ADDRESS": f"unix:path={bus.socket}"}
    host = Host(proxy_host, proxy_lib, LABEL, env)
    h = TimedHost(host)
    sig = digest(b"host").hex()
    recoveries = []
    try:
        assert h("init", "start")[0] == "CKR_OK"
        assert h("slots", "start")[0] == "CKR_OK"
        _, s = h("open", "start")
        assert h(f"login {s} {pin}", "start")[0] == "CKR_OK"
        assert h(f"sign {s} 1 ECDSA {sig}", "start")[0] == "CKR_OK"

        # 1. The daemon dies without a word.
        d.proc.kill()
        d.proc.wait()
        for cmd in (f"sign {s} 1 ECDSA {sig}", f"state {s}", "open", "slots", f"login {s} {pin}", f"close {s}"):
            h(cmd, "daemon killed")
        assert h(f"sign {s} 1 ECDSA {sig}", "daemon killed")[0] in ("CKR_DEVICE_REMOVED", "CKR_SESSION_HANDLE_INVALID")
        t0 = time.monotonic()
        start(caching=True)
        s = h.recover("daemon restarted")
        recoveries.append(time.monotonic() - t0)
        assert h(f"state {s}", "daemon restarted") == ("CKR_OK", "0")   # a new daemon: logged out
        assert h(f"login {s} {pin}", "daemon restarted")[0] == "CKR_OK"
        assert h(f"sign {s} 1 ECDSA {sig}", "daemon restarted")[0] == "CKR_OK"

        # 2. The bus goes away (the daemon with it), then comes back at the same address.
        bus.stop()
        time.sleep(0.5)
        for cmd in (f"sign {s} 1 ECDSA {sig}", f"state {s}", "open", "slots", f"logout {s}"):
            h(cmd, "bus down")
        t0 = time.monotonic()
        fresh = PublicBus(bus.dir)
        bus.__dict__.update(fresh.__dict__)   # the fixture's bus is now the new one (teardown too)
        start(caching=True)
        s = h.recover("bus restarted")
        recoveries.append(time.monotonic() - t0)
        assert h(f"login {s} {pin}", "bus restarted")[0] == "CKR_OK"
        assert h(f"sign {s} 1 ECDSA {sig}", "bus restarted")[0] == "CKR_OK"
        assert h("finalize", "end")[0] == "CKR_OK"
        assert host.proc.poll() is None
    finally:
        host.close()
    for phase, codes in h.codes.items():
        print(f"  {phase}: {sorted(codes)}")
    figure(ITEM, "host crashes across daemon kill + bus restart", 0, limit=0)
    figure(ITEM, "slowest proxy call while daemon/bus were away", round(h.slowest, 3), "s", limit=DEADLINE - 1)
    figure(ITEM, "codes seen while the daemon was killed", " ".join(sorted(h.codes["daemon killed"])))
    figure(ITEM, "codes seen while the bus was down", " ".join(sorted(h.codes["bus down"])))
    figure(ITEM, "recovery after daemon restart (restart to signing session)", round(recoveries[0], 2), "s")
    figure(ITEM, "recovery after bus restart (restart to signing session)", round(recoveries[1], 2), "s")


def test_forked_child_without_initialize(start, bus, hygiene_host, proxy_lib, secret_store):
    _, pin, _ = secret_store
    start(caching=True)
    out = subprocess.run([str(hygiene_host), str(proxy_lib), "forkcheck", LABEL, pin], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PINCACHE_BUS_ADDRESS": bus.address})
    assert out.returncode == 0, out.stdout + out.stderr
    lines = dict(l.rsplit(" ", 1) if l.count(" ") >= 1 and not l.startswith("parent child-exit") else (l, "")
                 for l in out.stdout.splitlines())
    child = {k: int(v, 16) for k, v in lines.items() if k.startswith("child ")}
    assert len(child) == 13, out.stdout
    wrong = {k: hex(v) for k, v in child.items() if v != CKR_CRYPTOKI_NOT_INITIALIZED}
    assert not wrong, f"calls in an uninitialised child that did not answer CKR_CRYPTOKI_NOT_INITIALIZED: {wrong}"
    for expected in ("parent C_Login 0x0", "parent sign 0x0", "parent child-exit 0x0 0", "parent sign-after 0x0",
                     "parent C_Finalize 0x0"):
        assert expected in out.stdout, out.stdout
    figure(ITEM, "forked child without C_Initialize: calls answered CKR_CRYPTOKI_NOT_INITIALIZED",
           f"{len(child) - len(wrong)}/{len(child)}")


def test_setuid_binary_ignores_bus_address(start, bus, hygiene_host, proxy_lib):
    need(os.geteuid() == 0, "making a setuid-root binary needs root")
    start(caching=True)
    _, uid, gid = unprivileged_user()
    area = world_readable_tmp("pincache-setuid-")
    try:
        plain = area / "hygiene_host"
        shutil.copy(hygiene_host, plain)
        plain.chmod(0o755)
        setuid = area / "hygiene_host-setuid"
        shutil.copy(hygiene_host, setuid)
        os.chown(setuid, 0, 0)
        setuid.chmod(0o4755)
        # The library must be loadable by the unprivileged user: it is in the build tree.
        env = {"PATH": "/usr/bin:/bin", "PINCACHE_BUS_ADDRESS": bus.address,
               # Nowhere: were the proxy to fall back to it, it would find nothing either.
               "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent/system_bus_socket"}

        def probe(exe):
            argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--",
                    str(exe), str(proxy_lib), "probe", LABEL]
            out = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
            assert out.returncode == 0, out.stdout + out.stderr
            return out.stdout

        control = probe(plain)
        assert f"ids 0x0 uid={uid} euid={uid}" in control, control
        assert "found 0x0 yes" in control, f"the plain binary did not reach the test daemon:\n{control}"
        elevated = probe(setuid)
        assert f"ids 0x0 uid={uid} euid=0" in elevated, f"the binary did not run setuid root:\n{elevated}"
        assert "found 0x0 yes" not in elevated, \
            f"a setuid binary followed PINCACHE_BUS_ADDRESS to the test daemon:\n{elevated}"
        print("  plain:  " + control.replace("\n", " | "))
        print("  setuid: " + elevated.replace("\n", " | "))
        figure(ITEM, "setuid binary reached the daemon named by PINCACHE_BUS_ADDRESS", 0,
               note="the same binary without setuid did")
    finally:
        shutil.rmtree(area, ignore_errors=True)
