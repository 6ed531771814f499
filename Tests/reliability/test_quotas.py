"""Issue 6 item 5 — quotas: more sessions per client (MaxSessionsPerClient), environments per
uid (256) or pending authorisations per caller (16) than allowed get the documented error,
the count never passes the quota, and memory stays flat over many refusals.

Pending authorisations exist only where polkit is consulted, i.e. on the system bus: the test
runs pincached with --bus system and DBUS_SYSTEM_BUS_ADDRESS pointing at the private bus, where
a scripted authority (fake_polkit.py) owns org.freedesktop.PolicyKit1 and never answers. What
this cannot show is real polkitd's own behaviour (prompts, its own limits)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dbus
import dbus.bus
import pytest

from buses import bus_with_limits
from conftest import need
from figures import record, rss_kib, sized
from cryptoki_wire import CryptokiSocket, WireError
from pincache_client import (BUS_NAME, ERR, PIN, SESSION, CallError, Client, wait_until)

HERE = Path(__file__).resolve().parent
ITEM = "5 quotas"
LIMITS_EXCEEDED = "org.freedesktop.DBus.Error.LimitsExceeded"
MAX_SESSIONS = 8
ENVIRONMENTS_PER_UID = 256
PENDING_PER_CALLER = 16
FLAT_KIB = 4 * 1024
CKF_SERIAL_SESSION = 4


@pytest.fixture
def bus(tmp_path):
    """Room for more than 256 connections of one uid (dbus-daemon's default per-user cap is 256)."""
    need(shutil.which("dbus-daemon"), "dbus-daemon not installed")
    b = bus_with_limits(tmp_path, max_connections_per_user=2048, max_completed_connections=4096,
                        max_incoming_bytes=268435456)
    yield b
    b.stop()


def test_sessions_per_client(start_daemon, make_client):
    daemon = start_daemon(caching=True, extra=[f"MaxSessionsPerClient={MAX_SESSIONS}"])
    pid = daemon.proc.pid
    a = make_client("A")
    tok, other = a.token(), a.token("pincache-second")

    wire = CryptokiSocket(a)
    wire_slot = next(x[0] for x in wire.call("GetSlots")[0] if x[7] == "pincache-demo")

    def open_wire():
        return ("wire", wire.call("OpenSession", wire_slot, CKF_SERIAL_SESSION)[0])

    def open_any(i):
        if i % 2:
            return open_wire()
        return ("bus", a.open_session(tok if i % 4 else other))

    def refused_open(i):
        try:
            open_any(i)
        except CallError as e:
            return e.name == ERR + "TooManySessions"
        except WireError as e:
            return e.rv == 0xB1  # CKR_SESSION_COUNT
        return False

    def close(session):
        kind, handle = session
        if kind == "bus":
            a.close_session(handle)
        else:
            wire.call("CloseSession", handle)

    sessions = [open_any(i) for i in range(MAX_SESSIONS)]
    # Both front ends draw on the one quota.
    assert refused_open(0) and refused_open(1)
    rounds = sized(2000, 20000)
    refused = 0
    rss0 = None
    for i in range(rounds):
        if i == rounds // 10:
            rss0 = rss_kib(pid)
        refused += refused_open(i)
        close(sessions.pop(0))
        sessions.append(open_any(i))
        if i % 100 == 0:
            assert a.statistics()["Sessions"] == MAX_SESSIONS
    rss1 = rss_kib(pid)
    stats = a.statistics()
    record(ITEM, "sessions: refused opens over the quota", refused, f"of {rounds}", limit=rounds, ok=refused == rounds)
    record(ITEM, "sessions: held at the end", stats["Sessions"], limit=MAX_SESSIONS, ok=stats["Sessions"] == MAX_SESSIONS)
    record(ITEM, "sessions: RSS growth over the refusals", rss1 - rss0, "KiB", limit=FLAT_KIB, ok=rss1 - rss0 <= FLAT_KIB)
    assert refused == rounds
    assert stats["Sessions"] == MAX_SESSIONS
    assert rss1 - rss0 <= FLAT_KIB, f"RSS grew {rss0} -> {rss1} KiB"


def test_environments_per_uid(start_daemon, bus):
    daemon = start_daemon(caching=True)
    pid = daemon.proc.pid
    cycles = sized(3, 20)
    refusals = []
    rss = []
    for cycle in range(cycles):
        clients = []
        for i in range(ENVIRONMENTS_PER_UID):
            c = Client(bus.address, f"env{i}")
            c.caller_state()
            clients.append(c)
        over = [Client(bus.address, f"over{i}") for i in range(8)]
        for c in over:
            try:
                c.caller_state()
                refusals.append(None)
            except CallError as e:
                refusals.append((e.name, e.message))
        stats = clients[0].statistics()
        assert stats["Environments"] == ENVIRONMENTS_PER_UID, stats
        # One leaves: one more is admitted.
        clients.pop().close()
        wait_until(lambda: over[0].statistics()["Environments"] == ENVIRONMENTS_PER_UID - 1,
                   what="a departed environment freed")
        over[0].caller_state()
        for c in clients + over:
            c.close()
        watcher = Client(bus.address, "watch")
        wait_until(lambda: watcher.statistics()["Environments"] == 0, timeout=30, what="every environment gone")
        watcher.close()
        rss.append(rss_kib(pid))
    names = {r[0] if r else "admitted" for r in refusals}
    growth = rss[-1] - rss[0]
    record(ITEM, "environments: refusals past 256 for one uid", sum(1 for r in refusals if r), f"of {len(refusals)}")
    record(ITEM, "environments: error", sorted(names), limit=LIMITS_EXCEEDED, ok=names == {LIMITS_EXCEEDED})
    record(ITEM, "environments: RSS growth over cycles", growth, "KiB", limit=FLAT_KIB, ok=growth <= FLAT_KIB)
    assert names == {LIMITS_EXCEEDED}, refusals[:3]
    assert "256" in refusals[0][1] and "(0x2)" in refusals[0][1], refusals[0]
    assert growth <= FLAT_KIB, rss


def test_pending_authorizations(pincached_bin, bus, tokens, daemon_env, tmp_path):
    need(pincached_bin.exists(), f"{pincached_bin} not built")
    from dbus.mainloop.glib import DBusGMainLoop
    from gi.repository import GLib

    counts_file = tmp_path / "polkit.json"
    polkit = subprocess.Popen([sys.executable, str(HERE / "fake_polkit.py"), bus.address, str(counts_file)],
                              stdout=subprocess.PIPE, text=True)
    cfg = tmp_path / "pincache.cfg"
    cfg.write_text("P11_EnableCachePIN=1\nModule=/usr/lib/softhsm/libsofthsm2.so\n")
    stderr = tmp_path / "pincached.stderr"
    env = {**daemon_env, "DBUS_SYSTEM_BUS_ADDRESS": bus.address}
    daemon = subprocess.Popen([str(pincached_bin), "--bus", "system", "--config", str(cfg)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(stderr, "wb"), env=env)
    try:
        assert polkit.stdout.readline().strip() == "ready"
        wait_until(lambda: daemon.poll() is not None or bus.name_has_owner(), timeout=20, what="pincached ready")
        assert daemon.poll() is None, stderr.read_text()
        observer = Client(bus.address, "observer")
        tok = observer.token()

        def polkit_counts():
            return json.loads(counts_file.read_text())

        loop = DBusGMainLoop()
        ctx = GLib.MainContext.default()
        cycles = sized(10, 100)
        sent = PENDING_PER_CALLER + 4
        rss = []
        refused_total = 0
        for cycle in range(cycles):
            conn = dbus.bus.BusConnection(bus.address, mainloop=loop)
            session = str(conn.call_blocking(BUS_NAME, tok, "org.pincache.Token1", "OpenSession", "", (), timeout=30))
            errors = []
            obj = conn.get_object(BUS_NAME, session, introspect=False)
            for _ in range(sent):
                obj.Login(PIN, dbus_interface=SESSION, timeout=120,
                          reply_handler=lambda: errors.append("answered"),
                          error_handler=lambda e: errors.append((e.get_dbus_name(), e.get_dbus_message())))
            deadline = time.monotonic() + 20
            while len(errors) < sent - PENDING_PER_CALLER and time.monotonic() < deadline:
                ctx.iteration(False)
                time.sleep(0.01)
            time.sleep(0.2)
            while ctx.pending():
                ctx.iteration(False)
            stats = observer.statistics()
            assert stats["PendingAuthorizations"] == PENDING_PER_CALLER, stats
            assert len(errors) == sent - PENDING_PER_CALLER, errors
            assert all(e[0] == ERR + "NotAuthorized" and "too many" in e[1] for e in errors), errors
            refused_total += len(errors)
            conn.close()
            wait_until(lambda: observer.statistics()["PendingAuthorizations"] == 0, what="checks cancelled")
            rss.append(rss_kib(daemon.pid))
        counts = wait_until(lambda: (lambda c: c if c["cancelled"] == cycles * PENDING_PER_CALLER else None)(polkit_counts()),
                            timeout=20, what="every held check cancelled")
        growth = rss[-1] - rss[0]
        record(ITEM, "pending authorisations: refused past 16", refused_total, f"of {cycles * sent}",
               limit=cycles * 4, ok=refused_total == cycles * 4)
        record(ITEM, "pending authorisations: checks cancelled on disconnect", counts["cancelled"],
               limit=cycles * PENDING_PER_CALLER, ok=counts["cancelled"] == cycles * PENDING_PER_CALLER)
        record(ITEM, "pending authorisations: RSS growth over cycles", growth, "KiB", limit=FLAT_KIB,
               ok=growth <= FLAT_KIB)
        assert counts["checks"] == cycles * PENDING_PER_CALLER
        assert growth <= FLAT_KIB, rss
        assert daemon.poll() is None, stderr.read_text()
        observer.close()
    finally:
        daemon.terminate()
        daemon.wait(10)
        polkit.terminate()
        polkit.wait(10)
