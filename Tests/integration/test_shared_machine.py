"""Issue 12 on a private bus: other users' typos cost you nothing, locks are bounded.

The same rules on the real system bus with polkitd and unprivileged users are in
Tests/system/test_system.py."""

import time

from pincache_client import digest, EC_KEY, ERR, PIN, verify, wait_until

MSG = b"pincache shared-machine message"


def test_another_callers_typo_holds_my_cached_pin_back_until_a_good_login(start_daemon, make_client, tokens):
    """Real SoftHSM: a wrong PIN sets CKF_USER_PIN_COUNT_LOW, a right one clears it (§4)."""
    start_daemon(caching=True)
    a, b = make_client("A"), make_client("B")
    tok = a.token()
    sa, sb = a.open_session(tok), b.open_session(tok)
    a.login(sa, PIN)
    verify(tokens.cert("ec"), "ECDSA", MSG, a.sign(sa, EC_KEY, "ECDSA", digest(MSG)))
    assert b.error(b.login, sb, "999999") == ERR + "PinIncorrect"
    # (Token1's flags follow at the next refresh; the daemon itself reads them fresh.)
    wait_until(lambda: a.token_props(tok)["UserPinCountLow"] is True, what="UserPinCountLow")
    # Held back, not destroyed: A is told, keeps its cache, and no PIN reaches the token.
    assert a.error(a.sign, sa, EC_KEY, "ECDSA", digest(MSG)) == ERR + "NotLoggedIn"
    assert a.cached() == {tok}
    # B gets it right: the token's counter is reset, and A signs again without a new PIN.
    b.login(sb, PIN)
    wait_until(lambda: a.token_props(tok)["UserPinCountLow"] is False, what="UserPinCountLow cleared")
    verify(tokens.cert("ec"), "ECDSA", MSG, a.sign(sa, EC_KEY, "ECDSA", digest(MSG)))


def test_an_idle_exclusive_login_ends_at_pin_cache_timeout(start_daemon, make_client, tokens):
    """§5: non-caching mode, PinCacheTimeout=1: the lock ends by itself, B can log in."""
    start_daemon(caching=False, extra=["PinCacheTimeout=1", "SlotPollInterval=200"])
    a, b = make_client("A"), make_client("B")
    tok = a.token()
    sa, sb = a.open_session(tok), b.open_session(tok)
    a.login(sa, PIN)
    assert a.locked() == {tok}
    assert b.error(b.login, sb, PIN) == ERR + "TokenBusy"
    started = time.monotonic()
    wait_until(lambda: a.locked() == set(), timeout=10, what="the idle lock to end")
    assert time.monotonic() - started >= 0.5
    assert a.error(a.sign, sa, EC_KEY, "ECDSA", digest(MSG)) == ERR + "NotLoggedIn"
    b.login(sb, PIN)
    verify(tokens.cert("ec"), "ECDSA", MSG, b.sign(sb, EC_KEY, "ECDSA", digest(MSG)))


def test_flush_caches_ends_exclusive_logins(start_daemon, make_client, tokens):
    """§5: FlushCaches releases the lock as well as the cached PINs."""
    start_daemon(caching=False)
    a, b = make_client("A"), make_client("B")
    tok = a.token()
    sa, sb = a.open_session(tok), b.open_session(tok)
    a.login(sa, PIN)
    assert b.error(b.login, sb, PIN) == ERR + "TokenBusy"
    b.flush()
    wait_until(lambda: a.locked() == set(), timeout=5, what="the lock to end after FlushCaches")
    assert a.error(a.sign, sa, EC_KEY, "ECDSA", digest(MSG)) == ERR + "NotLoggedIn"
    b.login(sb, PIN)
    verify(tokens.cert("ec"), "ECDSA", MSG, b.sign(sb, EC_KEY, "ECDSA", digest(MSG)))



def _flood_sockets(make_client, n, signer=None):
    """Opens up to n cryptoki sockets, one per new bus connection (as n proxies would),
    signing with `signer` between every ten: (sockets held, refusals, signature latencies)."""
    import dbus
    import cryptoki_wire
    held, refusals, latencies = [], [], []
    for i in range(n):
        c = make_client(f"F{i}")
        try:
            held.append((c, cryptoki_wire.open_socket(c)))
        except dbus.DBusException as e:
            refusals.append((e.get_dbus_name(), e.get_dbus_message()))
        if signer and i % 10 == 0:
            started = time.monotonic()
            signer()
            latencies.append(time.monotonic() - started)
    return held, refusals, latencies


def test_socket_flood_hits_a_clear_per_uid_limit_while_others_sign(start_daemon, make_client, tokens):
    """§2: one uid's 170 socket requests stop at 128 with LimitsExceeded naming the limit; a
    client signing meanwhile keeps p99 ≤ 50 ms; the daemon keeps its PID. (170: the test bus,
    like the system bus, allows a uid 256 connections.)"""
    d = start_daemon(caching=False)
    a = make_client("A")
    tok = a.token()
    sa = a.open_session(tok)
    a.login(sa, PIN)
    pid = d.proc.pid
    held, refusals, latencies = _flood_sockets(
        make_client, 170, lambda: verify(tokens.cert("ec"), "ECDSA", MSG, a.sign(sa, EC_KEY, "ECDSA", digest(MSG))))
    assert len(held) == 128, (len(held), refusals[:3])
    assert len(refusals) == 42
    assert all(name == "org.freedesktop.DBus.Error.LimitsExceeded" and "cryptoki sockets open already" in message
               for name, message in refusals), refusals[:3]
    latencies.sort()
    p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)]
    print(f"FIGURE socket flood: signature p99 = {p99 * 1000:.1f} ms over {len(latencies)}")
    assert p99 <= 0.05, latencies
    assert d.proc.poll() is None and d.proc.pid == pid
    # The held sockets still work.
    s = held[0][1]
    import cryptoki_wire
    w = cryptoki_wire.CryptokiSocket(sock=s)
    assert w.call("GetSlots")[0]


def test_short_of_descriptors_refuses_sockets_instead_of_dying(start_daemon, make_client, tokens):
    """§2: with 230 descriptors allowed, sockets are refused (naming the reason) while 128 stay
    free for the rest; the daemon signs on and keeps its PID."""
    import subprocess
    d = start_daemon(caching=True)
    subprocess.run(["prlimit", f"--pid={d.proc.pid}", "--nofile=230:230"], check=True)
    a = make_client("A")
    tok = a.token()
    sa = a.open_session(tok)
    a.login(sa, PIN)
    held, refusals, _ = _flood_sockets(make_client, 120)
    assert 0 < len(held) < 100 and refusals, (len(held), refusals[:3])
    assert all(name == "org.freedesktop.DBus.Error.LimitsExceeded" and "short of file descriptors" in message
               for name, message in refusals), refusals[:3]
    verify(tokens.cert("ec"), "ECDSA", MSG, a.sign(sa, EC_KEY, "ECDSA", digest(MSG)))
    b = make_client("B")
    sb = b.open_session(a.token("pincache-second"))
    b.login(sb, PIN)
    assert d.proc.poll() is None
    assert "short of file descriptors" in d.stderr_text()


def test_requests_one_uid_sends_are_held_within_its_byte_budget(start_daemon, make_client, tokens, faultshim):
    """§2: a client that piles up slow 16 MiB requests is no longer read once its uid's
    requests and replies in the daemon reach 128 MiB: the daemon's memory stays bounded, and a
    client on the bus still signs. Closing the socket gives every byte back."""
    import threading
    import cryptoki_wire
    d = start_daemon(caching=True, module="shim", shim=faultshim)
    faultshim.delay_ms(300)  # every C_SignInit: the requests queue on the token
    a = make_client("A")
    tok = a.token()
    sa = a.open_session(tok)
    a.login(sa, PIN)
    flooder = make_client("flood")
    w = cryptoki_wire.CryptokiSocket(flooder)
    slots = w.call("GetSlots")[0]
    slot = next(s[0] for s in slots if s[7] == "pincache-demo")
    session = w.call("OpenSession", slot, 0x6)[0]
    w.call("Login", session, 1, PIN.encode())
    template = [(0x0, (3).to_bytes(8, "little")), (0x102, b"\x02")]  # CKA_CLASS private key, CKA_ID 02
    key = w.call("FindObjects", session, template, 10)[0][0]
    big = b"\x00" * ((16 << 20) - 64)
    frames = [cryptoki_wire.request("Sign", session, (0x1, b""), key, big, tag=100 + i) for i in range(24)]

    def pour():
        try:
            for f in frames:
                w.sock.sendall(f)
        except OSError:
            pass
    t = threading.Thread(target=pour, daemon=True)
    t.start()
    time.sleep(3)
    held = make_client("admin").statistics()["CryptokiHeldBytes"]
    rss = int(next(line.split()[1] for line in open(f"/proc/{d.proc.pid}/status") if line.startswith("VmRSS:")))
    print(f"FIGURE byte budget: held {held >> 20} MiB, daemon RSS {rss >> 10} MiB with 384 MiB sent")
    assert 0 < held <= (128 + 17) << 20, held
    assert rss < 600 << 10, rss
    faultshim.delay_ms(0)
    verify(tokens.cert("ec"), "ECDSA", MSG, a.sign(sa, EC_KEY, "ECDSA", digest(MSG)))
    w.sock.close()
    wait_until(lambda: make_client("admin2").statistics()["CryptokiHeldBytes"] == 0, timeout=30,
               what="the closed socket's bytes to be given back")
    assert d.proc.poll() is None
