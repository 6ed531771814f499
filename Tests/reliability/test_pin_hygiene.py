"""Issue 6 item 7: PIN hygiene, read from the outside (/proc/PID/smaps + /proc/PID/mem of
pincached, as root) with a 40-character random PIN that cannot occur by accident.

- while cached, every copy of the PIN in the daemon lies in locked ("lo") and
  don't-dump ("dd") memory;
- 1 s after logout, last-session close, disconnect, FlushCaches (and after SignOnce /
  SignWithPin, which never cache): no copy anywhere in the daemon, libdbus's buffers
  included; the same through the PKCS#11 proxy (a C host);
- token removal (virtual OpenPGP card pulled) leaves no copy either;
- the daemon is not dumpable, `kill -SEGV` leaves no core, the PIN is in no log;
- with RLIMIT_MEMLOCK too low, logins are refused with ONE clear log line.
"""

import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import dbus
import dbus.lowlevel
import pytest

from hygiene_support import (  # noqa: F401 (fixtures)
    Host, bus, build_dir, describe_hits, figure, make_client, need, pincached_bin, proxy_host, proxy_lib,
    random_pin, scan, secret_store, sized, start, unprivileged_user, wait_until, world_readable_tmp)
from pincache_client import BUS_NAME, ERR, SESSION, CallError, Client, ay, digest

ITEM = 7
LABEL = "pincache-demo"
SETTLE = 1.0   # "1 s after" the event


def protected_while_cached(pid, pin, what):
    """Every copy of the PIN is in locked, don't-dump memory; returns how many there are."""
    hits = scan(pid, pin)
    assert hits, f"{what}: the cached PIN is nowhere in the daemon's memory (is the scanner blind?)"
    exposed = [h for h in hits if not h.protected]
    assert not exposed, f"{what}: PIN copies outside locked+dontdump memory:\n{describe_hits(exposed)}"
    return len(hits)


def gone_after(pid, pin, what):
    """1 s after `what`: no copy of the PIN anywhere in the daemon."""
    time.sleep(SETTLE)
    hits = scan(pid, pin)
    assert not hits, f"1 s after {what}: {len(hits)} PIN copies left:\n{describe_hits(hits)}"
    return 0


def no_pin_in_logs(d, pin):
    text = d.stderr_path.read_bytes() + d.stderr_path.with_suffix(".stdout").read_bytes()
    assert pin.encode() not in text, "the PIN appears in the daemon's output"
    return len(text)


# --- the D-Bus API ----------------------------------------------------------------------

def send_raw(client, path, interface, member, signature, *args):
    """Queues a method call without waiting for its reply (pipelining)."""
    msg = dbus.lowlevel.MethodCallMessage(BUS_NAME, path, interface, member)
    msg.append(signature=signature, *args)
    client.conn.send_message(msg)


def test_dbus_api_pin_lifecycle(start, make_client, secret_store):
    _, pin, _ = secret_store
    d = start(caching=True)
    pid = d.pid
    a = make_client("A")
    tok = a.token(LABEL)
    results = {}

    def login(client, session):
        client.login(session, pin)
        assert tok in client.cached()
        results.setdefault("copies while cached", []).append(
            protected_while_cached(pid, pin, f"after Login of {client.name}"))

    # Logout.
    s = a.open_session(tok)
    login(a, s)
    a.sign(s, b"\x01", "ECDSA", digest(b"m"))
    a.logout(s)
    results["logout"] = gone_after(pid, pin, "Logout")

    # Last session closed (two sessions share the cached PIN; only the last close drops it).
    s2 = a.open_session(tok)
    login(a, s)
    a.close_session(s)
    assert tok in a.cached()
    a.close_session(s2)
    results["last session closed"] = gone_after(pid, pin, "closing the last session")

    # Disconnect.
    b = make_client("B")
    sb = b.open_session(tok)
    login(b, sb)
    b.close()
    wait_until(lambda: a.gone_from_bus(b), what="B gone from the bus")
    results["disconnect"] = gone_after(pid, pin, "the caller's disconnect")

    # FlushCaches (root is allowed; polkit is off on a private bus).
    s = a.open_session(tok)
    login(a, s)
    a.flush()
    assert tok not in a.cached()
    results["FlushCaches"] = gone_after(pid, pin, "FlushCaches")

    # PINs that are never cached: SignOnce and SignWithPin.
    a.sign_once(tok, pin, b"\x01", "ECDSA", digest(b"once"))
    results["SignOnce"] = gone_after(pid, pin, "SignOnce")
    a.login(s, pin)
    a.sign_with_pin(s, pin, b"\x01", "ECDSA", digest(b"with pin"))
    a.logout(s)
    results["SignWithPin + Logout"] = gone_after(pid, pin, "SignWithPin and Logout")

    # Pipelined: the Login arrives in the same socket reads as a large call behind it, so
    # libdbus's receive buffer grows and compacts around the PIN's bytes.
    c = make_client("C")
    sc = c.open_session(tok)
    big = bytes(900 * 1024)
    for _ in range(3):
        send_raw(c, sc, SESSION, "Login", "s", pin)
        send_raw(c, sc, SESSION, "Sign", "aysay", ay(b"\x01"), "ECDSA", ay(big))
        wait_until(lambda: tok in c.cached(), what="pipelined login cached")
        protected_while_cached(pid, pin, "pipelined Login")
        c.logout(sc)
    results["pipelined Login + 900 KiB call, Logout"] = gone_after(pid, pin, "pipelined logins and logout")

    # Churn: calls of many sizes before and after each Login make libdbus grow, move and
    # shrink its receive buffer (and free the old one) while it holds the PIN's bytes.
    sizes = [0, 700, 1900, 2100, 4000, 9000, 70000, 300000]
    for round_ in range(sized(3, 12)):
        for n in sizes:
            send_raw(c, sc, SESSION, "Sign", "aysay", ay(b"\x01"), "ECDSA", ay(bytes(n)))
            send_raw(c, sc, SESSION, "Login", "s", pin)
            send_raw(c, sc, SESSION, "Sign", "aysay", ay(b"\x01"), "ECDSA", ay(bytes(sizes[-1] - n)))
            wait_until(lambda: tok in c.cached(), what="churned login cached")
            c.logout(sc)
    results["churned logins (varied call sizes), Logout"] = gone_after(pid, pin, "churned logins and logouts")

    # A wrong PIN is a secret too.
    wrong = random_pin()
    assert a.error(a.login, s, wrong) == ERR + "PinIncorrect"
    results["wrong PIN rejected"] = gone_after(pid, wrong, "a rejected PIN")

    log_bytes = no_pin_in_logs(d, pin)
    assert wrong.encode() not in d.stderr_path.read_bytes()
    for name, value in results.items():
        if name == "copies while cached":
            figure(ITEM, "D-Bus: PIN copies while cached (all in locked+dontdump memory)", max(value))
        else:
            figure(ITEM, f"D-Bus: PIN copies 1 s after {name}", value, limit=0)
    figure(ITEM, "D-Bus: PIN occurrences in the daemon's log", 0, note=f"{log_bytes} bytes of --verbose log")


# --- the proxy path -----------------------------------------------------------------------

def test_proxy_pin_lifecycle(start, proxy_host, proxy_lib, bus, secret_store):
    _, pin, _ = secret_store
    d = start(caching=True)
    pid = d.pid
    env = {"PINCACHE_BUS_ADDRESS": bus.address}
    hosts = []

    def host():
        h = Host(proxy_host, proxy_lib, LABEL, env)
        hosts.append(h)
        assert h("init")[0] == "CKR_OK"
        return h

    def login(h, s):
        assert h(f"login {s} {pin}")[0] == "CKR_OK"
        return protected_while_cached(pid, pin, "after C_Login through the proxy")

    results = {}
    try:
        h = host()
        _, s = h("open")
        cached = [login(h, s)]
        assert h(f"sign {s} 1 ECDSA {digest(b'p').hex()}")[0] == "CKR_OK"
        assert h(f"logout {s}")[0] == "CKR_OK"
        results["C_Logout"] = gone_after(pid, pin, "C_Logout")

        cached.append(login(h, s))
        assert h(f"close {s}")[0] == "CKR_OK"
        results["C_CloseSession (last)"] = gone_after(pid, pin, "C_CloseSession of the last session")

        _, s = h("open")
        cached.append(login(h, s))
        assert h("finalize")[0] == "CKR_OK"
        results["C_Finalize"] = gone_after(pid, pin, "C_Finalize")

        k = host()
        _, s = k("open")
        cached.append(login(k, s))
        k.proc.kill()
        k.proc.wait()
        results["host killed"] = gone_after(pid, pin, "the host process was killed")
    finally:
        for h in hosts:
            h.close()
    no_pin_in_logs(d, pin)
    figure(ITEM, "proxy: PIN copies while cached (all in locked+dontdump memory)", max(cached))
    for name, value in results.items():
        figure(ITEM, f"proxy: PIN copies 1 s after {name}", value, limit=0)


# --- process protections ------------------------------------------------------------------

def test_not_dumpable_and_no_core(start, tmp_path, secret_store):
    """The daemon runs as `nobody` here so that the kernel's non-dumpable marker shows from
    outside: the files in /proc/PID of a non-dumpable process belong to root, whoever runs it."""
    _, pin, _ = secret_store
    name, uid, gid = unprivileged_user()
    work = world_readable_tmp("pincache-hygiene-")
    try:
        d = start(caching=True, user=(uid, gid), workdir=work)
        status = {k: v for k, v in (l.split(":", 1) for l in Path(f"/proc/{d.pid}/status").read_text().splitlines())}
        assert int(status["Uid"].split()[0]) == uid, "the daemon is not running as the unprivileged user"
        assert os.stat(f"/proc/{d.pid}/status").st_uid == 0, \
            "/proc/PID/status of the daemon belongs to its user: it is dumpable (PR_SET_DUMPABLE not 0)"
        limits = Path(f"/proc/{d.pid}/limits").read_text()
        core = next(l for l in limits.splitlines() if l.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"], core

        c = Client(d.bus.address, "dumper")
        s = c.open_session(c.token(LABEL))
        c.login(s, pin)
        cores = tmp_path / "cores"
        cores.mkdir()
        cores.chmod(0o1777)
        with core_pattern(str(cores / "core.%e.%p")):
            # The harness itself must be able to see a core: a dumpable process in the same
            # setting leaves one (else "no core" would prove nothing).
            hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
            need(hard != 0, "RLIMIT_CORE hard limit is 0: no process here can dump core")
            control = subprocess.Popen(
                ["sleep", "30"], preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (hard, hard)))
            control.send_signal(signal.SIGSEGV)
            control.wait()
            wait_until(lambda: any(cores.iterdir()), timeout=10, what="the control process's core file")
            control_cores = list(cores.iterdir())
            for f in control_cores:
                f.unlink()
            d.proc.send_signal(signal.SIGSEGV)
            d.proc.wait(10)
            assert d.proc.returncode == -signal.SIGSEGV, d.proc.returncode
            time.sleep(1.0)
            left = list(cores.iterdir())
        c.close()
        assert not left, f"kill -SEGV left a core: {left}"
        no_pin_in_logs(d, pin)
        figure(ITEM, "daemon dumpable", 0, note="root owns /proc/PID/* of the daemon running as nobody")
        figure(ITEM, "core files after kill -SEGV (control process: %d)" % len(control_cores), len(left))
    finally:
        subprocess.run(["rm", "-rf", str(work)])


class core_pattern:
    """Sets /proc/sys/kernel/core_pattern for the block and restores it."""

    PATH = Path("/proc/sys/kernel/core_pattern")

    def __init__(self, pattern):
        self.pattern = pattern

    def __enter__(self):
        self.saved = self.PATH.read_text().rstrip("\n")
        try:
            self.PATH.write_text(self.pattern)
        except OSError as e:
            need(False, f"cannot set core_pattern: {e}")
        return self

    def __exit__(self, *exc):
        self.PATH.write_text(self.saved)


def test_memlock_cap_refuses_caching_with_one_log_line(start, proxy_host, proxy_lib, bus, secret_store):
    """As `nobody` (root's CAP_IPC_LOCK would ignore the limit) with RLIMIT_MEMLOCK = 0."""
    _, pin, _ = secret_store
    _, uid, gid = unprivileged_user()
    work = world_readable_tmp("pincache-memlock-")
    try:
        d = start(caching=True, user=(uid, gid), memlock=0, workdir=work)
        limits = Path(f"/proc/{d.pid}/limits").read_text()
        assert any(l.startswith("Max locked memory") and l.split()[3:5] == ["0", "0"] for l in limits.splitlines()), limits
        c = Client(bus.address, "capped")
        tok = c.token(LABEL)
        s = c.open_session(tok)
        errors = [c.error(c.login, s, pin) for _ in range(3)]
        assert errors == [ERR + "SecureMemoryUnavailable"] * 3, errors
        assert tok not in c.cached()
        h = Host(proxy_host, proxy_lib, LABEL, {"PINCACHE_BUS_ADDRESS": bus.address})
        try:
            assert h("init")[0] == "CKR_OK"
            _, hs = h("open")
            rvs = [h(f"login {hs} {pin}")[0] for _ in range(2)]
        finally:
            h.close()
        # CKR_DEVICE_MEMORY (0x31): the proxy passes the daemon's code through.
        assert rvs == ["0x31", "0x31"], rvs
        time.sleep(0.5)
        log = d.stderr_text()
        lines = [l for l in log.splitlines() if "lock" in l.lower() and "memory" in l.lower()]
        assert len(lines) == 1, "want one log line about locked memory, got:\n" + "\n".join(lines)
        assert "RLIMIT_MEMLOCK" in lines[0] or "LimitMEMLOCK" in lines[0], lines[0]
        assert scan(d.pid, pin) == [], "a refused PIN stayed in memory"
        no_pin_in_logs(d, pin)
        c.close()
        figure(ITEM, "memlock=0: logins refused (D-Bus + proxy)", len(errors) + len(rvs))
        figure(ITEM, "memlock=0: log lines about locked memory", len(lines), note=lines[0])
    finally:
        subprocess.run(["rm", "-rf", str(work)])


# --- token removal: the virtual OpenPGP card ----------------------------------------------

from fixtures import OPENSC_CONF, OPENSC_PKCS11, pcscd, vcard_factory  # noqa: E402,F401 (fixtures)


def card_token(client, card, timeout=30):
    """The card's signature-PIN token object, once the daemon shows it present."""
    def find():
        for t in client.tokens():
            p = client.token_props(t)
            if p["Present"] and p["Serial"] == card.token_serial and "(sig)" in p["Label"]:
                return t
        return None
    return wait_until(find, timeout=timeout, what=f"card {card.serial} as a token")


def test_card_removal_wipes_the_pin(start, pcscd, vcard_factory, make_client):
    need(os.path.exists(OPENSC_PKCS11), f"{OPENSC_PKCS11} missing (apt-get install opensc-pkcs11)")
    pin = random_pin()
    card = vcard_factory("hyg", pin=pin).insert()
    d = start(caching=True, module=OPENSC_PKCS11, env={"OPENSC_CONF": str(OPENSC_CONF)},
              extra=["SlotPollInterval=300"])
    a = make_client("A")
    tok = card_token(a, card)
    s = a.open_session(tok)
    a.login(s, pin)
    cached = [protected_while_cached(d.pid, pin, "after Login on the card")]
    a.sign(s, b"\x01", "ECDSA", digest(b"card"))
    a.logout(s)
    gone_after(d.pid, pin, "Logout on the card (OpenSC in the daemon included)")
    a.login(s, pin)
    a.sign(s, b"\x01", "ECDSA", digest(b"card 2"))
    cached.append(protected_while_cached(d.pid, pin, "after a signature with the cached PIN"))
    card.pull()
    wait_until(lambda: not a.token_props(tok)["Present"], timeout=20, what="Present=false after the pull")
    assert tok not in a.cached()
    assert a.statistics()["CachedPINs"] == 0
    gone_after(d.pid, pin, "the card was pulled")
    no_pin_in_logs(d, pin)
    figure(ITEM, "card: PIN copies while cached (all in locked+dontdump memory)", max(cached))
    figure(ITEM, "card: PIN copies 1 s after Logout", 0, limit=0)
    figure(ITEM, "card: PIN copies 1 s after token removal", 0, limit=0)
