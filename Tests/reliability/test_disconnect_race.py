"""Issue 6 item 4 — disconnect race: thousands of rounds of "send Login, Sign or SignOnce, then
close or SIGKILL the client at once". Afterwards: the daemon is the same process, no
environment, session, cached PIN, lock or pending authorisation is left (Manager1.GetStatistics),
and no fd is left open.

"0 operations performed for a caller that is gone" is measured where it is deterministic: the
token is made slow (fault shim delay_ms) and busy with one client's signature while victims
queue Login/Sign behind it and leave; the shim's C_Login log then shows the busy client's
login and none of the victims'. (In caching mode every Login and every Sign costs the
backend exactly one C_Login, so the log counts both.)"""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import dbus
import dbus.bus
import dbus.lowlevel

from figures import fd_count, record, rss_kib, sized
from pincache_client import BUS_NAME, EC_KEY, PIN, SESSION, digest, verify, wait_until

HERE = Path(__file__).resolve().parent
ITEM = "4 disconnect race"
PROCS = 4
ROUNDS = sized(2000, 20000)
WINDOWS = sized(5, 50)
VICTIMS = sized(40, 100)
DELAY_MS = 300
MSG = b"disconnect race"


last_stats = {}


def settled(observer, baseline_envs):
    s = observer.statistics()
    last_stats.clear()
    last_stats.update(s)
    return (s["Environments"] == baseline_envs and s["Sessions"] == 0 and s["CachedPINs"] == 0
            and s["LockedTokens"] == 0 and s["PendingAuthorizations"] == 0) and s


def test_disconnect_race(start_daemon, faultshim, make_client, bus, tokens):
    daemon = start_daemon(caching=True, module="shim", shim=faultshim)
    pid = daemon.proc.pid
    observer = make_client("observer")
    tok = observer.token()
    # GetStatistics creates no environment: the baseline is 0 environments until the observer
    # calls something else.
    base_fds, base_rss = fd_count(pid), rss_kib(pid)

    # --- random timing: close or kill right after the call is on the wire --------------
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(HERE / "race_client.py"), bus.address, tok,
                               str(ROUNDS // PROCS), str(i), PIN],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(PROCS)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        assert p.returncode == 0, f"race client failed:\n{err[-3000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    duration = time.monotonic() - t0
    rounds = sum(r["rounds"] for r in results)
    try:
        stats = wait_until(lambda: settled(observer, 0), timeout=60, what="every raced environment gone")
    except AssertionError as e:
        raise AssertionError(f"{e}; last statistics {last_stats}") from None
    logins = faultshim.logins()
    assert daemon.proc.poll() is None, "pincached died:\n" + daemon.stderr_text()
    assert all(rv == 0 for _, rv in logins), "a backend login failed"
    # At most one backend login per Login or Sign sent, plus the sign rounds' own logins.
    sent_ops = rounds
    assert len(logins) <= sent_ops + sum(r["setup_logins"] for r in results)
    record(ITEM, "rounds (send, then close or SIGKILL)", rounds, "rounds")
    record(ITEM, "closed / killed", f"{sum(r['closed'] for r in results)} / {sum(r['killed'] for r in results)}")
    record(ITEM, "random-timing phase duration", round(duration, 1), "s")
    record(ITEM, "backend C_Login during random phase", len(logins), "calls")

    # --- deterministic: victims queue behind a slow operation and leave -----------------
    blocker = make_client("blocker")
    sb = blocker.open_session(tok)
    blocker.login(sb, PIN)
    gone_ops = 0
    victims_total = 0
    for window in range(WINDOWS):
        victims = []
        for i in range(VICTIMS):
            conn = dbus.bus.BusConnection(bus.address)
            s = str(conn.call_blocking(BUS_NAME, tok, "org.pincache.Token1", "OpenSession", "", (), timeout=30))
            if i % 2 == 0:
                conn.call_blocking(BUS_NAME, s, SESSION, "Login", "s", (PIN,), timeout=30)
            victims.append((conn, s, i % 2 == 0))
        before = len(faultshim.logins())
        faultshim.delay_ms(DELAY_MS)
        sig = {}
        th = threading.Thread(target=lambda: sig.setdefault("v", blocker.sign(sb, EC_KEY, "ECDSA", digest(MSG))))
        th.start()
        time.sleep(DELAY_MS / 1000 / 2)  # the blocker's bracket is running on the token's worker
        for conn, s, logged_in in victims:
            m = dbus.lowlevel.MethodCallMessage(BUS_NAME, s, SESSION, "Sign" if logged_in else "Login")
            if logged_in:
                m.append(dbus.ByteArray(EC_KEY), "ECDSA", dbus.ByteArray(digest(MSG)), signature="aysay")
            else:
                m.append(PIN, signature="s")
            conn.send_message(m)
            conn.flush()
            conn.close()
        victims_total += len(victims)
        th.join(60)
        assert not th.is_alive(), "the blocker's signature did not finish"
        verify(tokens.cert("ec"), "ECDSA", MSG, sig["v"])
        (faultshim.dir / "delay_ms").unlink()
        # ListKeys runs on the same worker: once it answers, every queued victim job has had its turn.
        observer.list_keys(tok)
        new = len(faultshim.logins()) - before
        gone_ops += new - 1
    assert daemon.proc.poll() is None, "pincached died:\n" + daemon.stderr_text()
    blocker.close_session(sb)
    stats = wait_until(lambda: settled(observer, baseline_envs=2), timeout=60, what="victims' environments gone")
    after_fds, after_rss = fd_count(pid), rss_kib(pid)
    record(ITEM, "victims that queued Login/Sign behind a slow op and left", victims_total, "callers")
    record(ITEM, "backend operations performed for a gone caller", gone_ops, "ops", limit=0, ok=gone_ops == 0)
    left = (stats["Environments"] - 2, stats["Sessions"], stats["CachedPINs"], stats["PendingAuthorizations"])
    record(ITEM, "environments / sessions / cached PINs / pending auth left", " / ".join(map(str, left)),
           limit="0 / 0 / 0 / 0", ok=left == (0, 0, 0, 0))
    record(ITEM, "daemon crashes", 0 if daemon.proc.poll() is None else 1, limit=0, ok=daemon.proc.poll() is None)
    record(ITEM, "fds baseline -> after", f"{base_fds} -> {after_fds}", limit="equal", ok=after_fds == base_fds)
    record(ITEM, "RSS baseline -> after", f"{base_rss} -> {after_rss}", "KiB")
    record(ITEM, "CallsServed / errors (daemon)", f"{stats['CallsServed']} / {dict(stats['Errors'])}")
    assert gone_ops == 0, f"{gone_ops} backend operation(s) ran for callers that had left"
    assert after_fds == base_fds, f"fd leak: {base_fds} -> {after_fds}"
