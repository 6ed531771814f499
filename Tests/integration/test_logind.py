"""Issue 15 §2: locking a desktop session ends the logins of the callers in it; suspending
ends everyone's. logind is played by fake_logind.py on the test bus, emitting its real signals
(Session.Lock, Manager.PrepareForSleep) and answering GetSessionByPID as logind does."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pincache_client import EC_KEY, ERR, PIN, digest, wait_until
from signal_monitor import SignalMonitor

HERE = Path(__file__).resolve().parent

# A client in a process of its own (pytest's clients all share this pid): logs in, says
# "ready", and on each line of input prints which tokens still have its cached PIN.
OTHER_CLIENT = """
import sys
sys.path.insert(0, %r)
from pincache_client import Client, PIN
c = Client(sys.argv[1], "other")
c.login(c.open_session(c.token()), PIN)
print("ready", flush=True)
for _ in sys.stdin:
    print(" ".join(sorted(c.cached())) or "-", flush=True)
""" % str(HERE)


class FakeLogind:
    def __init__(self, address, tmp_path):
        self.sessions_file = tmp_path / "sessions.json"
        self.sessions_file.write_text("{}")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "fake_logind.py"), address, str(self.sessions_file)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def place(self, pid, session):
        sessions = json.loads(self.sessions_file.read_text())
        sessions[str(pid)] = session
        self.sessions_file.write_text(json.dumps(sessions))

    def send(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "sent"

    def stop(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def logind(bus, tmp_path):
    fake = FakeLogind(bus.address, tmp_path)
    yield fake
    fake.stop()


def other_client(address):
    proc = subprocess.Popen([sys.executable, "-c", OTHER_CLIENT, address], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def cached_of(proc):
    proc.stdin.write("?\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def test_lock_ends_the_locked_sessions_logins_only(start_daemon, make_client, bus, logind):
    start_daemon(caching=True)
    mon = SignalMonitor(bus.address, "type='signal',member='CacheCleared'")
    other = other_client(bus.address)
    try:
        a = make_client("A")
        tok = a.token()
        s = a.open_session(tok)
        a.login(s, PIN)
        logind.place(os.getpid(), "c1")
        logind.place(other.pid, "c2")
        logind.send("lock c2")
        wait_until(lambda: cached_of(other) == "-", what="the locked session's cached PIN wiped")
        assert a.cached() == {tok}
        a.sign(s, EC_KEY, "ECDSA", digest(b"still cached"))
        wait_until(lambda: [x["args"][1:] for x in mon.signals() if x["member"] == "CacheCleared"] == [["lock"]],
                   what="CacheCleared(lock) to the other client only")
        logind.send("lock c1")
        wait_until(lambda: a.cached() == set(), what="A's cached PIN wiped by its own session's lock")
        assert a.error(a.sign, s, EC_KEY, "ECDSA", digest(b"gone")) == ERR + "NotLoggedIn"
        assert a.open_session(tok)  # sessions stay
    finally:
        other.kill()
        mon.stop()


def test_suspend_ends_everyones_logins_and_resume_does_nothing(start_daemon, make_client, bus, logind):
    start_daemon(caching=False)
    a, b = make_client("A"), make_client("B")
    tok = a.token()
    sa = a.open_session(tok)
    a.login(sa, PIN)
    logind.send("sleep false")
    assert a.locked() == {tok}
    mon = SignalMonitor(bus.address, "type='signal',member='CacheCleared'")
    try:
        logind.send("sleep true")
        wait_until(lambda: a.locked() == set(), what="the exclusive login ended for suspend")
        wait_until(lambda: [x["args"][1:] for x in mon.signals() if x["member"] == "CacheCleared"] == [["suspend"]],
                   what="CacheCleared(suspend)")
        # The token is free again, and the backend logged out: another caller can log in.
        b.login(b.open_session(tok), PIN)
    finally:
        mon.stop()


def test_the_keys_turn_it_off(start_daemon, make_client, logind):
    start_daemon(caching=True, extra=["FlushCacheOnLock=0", "FlushCacheOnSuspend=0"])
    a = make_client("A")
    tok = a.token()
    a.login(a.open_session(tok), PIN)
    logind.place(os.getpid(), "c1")
    logind.send("lock c1")
    logind.send("sleep true")
    # Give the daemon the time it needs to act on a signal (it would within milliseconds).
    time.sleep(1)
    assert a.cached() == {tok}
