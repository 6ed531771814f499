"""Issue 15 §3, §4, §6: the cache's state on the bus. CacheCleared(token, reason) to the
affected caller only, GetCallerState's Expiry and UsesLeft, PinCacheMaxUses, Token1.LockedBy
and Token1.PinTriesLeft."""

import os
import sys

from pincache_client import EC_KEY, ERR, PIN, digest, wait_until
from signal_monitor import SignalMonitor

MSG = b"cache state"


def cleared(mon, caller=None):
    return [(s["destination"], s["args"][0], s["args"][1]) for s in mon.signals()
            if s["member"] == "CacheCleared" and len(s["args"]) == 2  # (its lines may still be arriving)
            and (caller is None or s["destination"] == caller)]


def test_cache_cleared_goes_to_its_caller_only_with_the_reason(start_daemon, make_client, bus):
    start_daemon(caching=True)
    mon = SignalMonitor(bus.address, "type='signal',member='CacheCleared'")
    try:
        a, b = make_client("A"), make_client("B")
        tok = a.token()
        sa, sb = a.open_session(tok), b.open_session(tok)
        a.login(sa, PIN)
        b.login(sb, PIN)
        a.logout(sa)
        wait_until(lambda: cleared(mon) == [(a.unique_name, tok, "logout")], what="CacheCleared(logout) to A")
        a.login(sa, PIN)
        a.flush()
        wait_until(lambda: len(cleared(mon)) == 3, what="FlushCaches reported to A and B")
        assert sorted(cleared(mon)[1:]) == sorted([(a.unique_name, tok, "flush"), (b.unique_name, tok, "flush")])
        assert all(s["destination"] for s in mon.signals() if s["member"] == "CacheCleared"), "a CacheCleared was broadcast"
    finally:
        mon.stop()


def test_use_limit_wipes_the_pin_and_says_so(start_daemon, make_client, bus):
    start_daemon(caching=True, extra=["PinCacheMaxUses=2"])
    mon = SignalMonitor(bus.address, "type='signal',member='CacheCleared'")
    try:
        a = make_client("A")
        tok = a.token()
        s = a.open_session(tok)
        a.login(s, PIN)
        assert a.caller_state()["UsesLeft"] == {tok: 2}
        a.sign(s, EC_KEY, "ECDSA", digest(MSG))
        assert a.caller_state()["UsesLeft"] == {tok: 1}
        a.sign(s, EC_KEY, "ECDSA", digest(MSG))
        wait_until(lambda: cleared(mon) == [(a.unique_name, tok, "uses")], what="CacheCleared(uses)")
        assert a.cached() == set() and a.caller_state()["UsesLeft"] == {}
        assert a.error(a.sign, s, EC_KEY, "ECDSA", digest(MSG)) == ERR + "NotLoggedIn"
        # A new login starts a new count.
        a.login(s, PIN)
        assert a.caller_state()["UsesLeft"] == {tok: 2}
    finally:
        mon.stop()


def test_expiry_counts_down_and_timeout_is_reported(start_daemon, make_client, bus):
    start_daemon(caching=True, extra=["PinCacheTimeout=2", "SlotPollInterval=100"])
    mon = SignalMonitor(bus.address, "type='signal',member='CacheCleared'")
    try:
        a = make_client("A")
        tok = a.token()
        a.login(a.open_session(tok), PIN)
        assert a.caller_state()["Expiry"][tok] in (1, 2)
        wait_until(lambda: cleared(mon) == [(a.unique_name, tok, "timeout")], timeout=10, what="CacheCleared(timeout)")
        assert a.caller_state()["Expiry"] == {}
    finally:
        mon.stop()


def test_locked_by_names_the_holder_and_nothing_more(start_daemon, make_client, bus):
    start_daemon(caching=False)
    mon = SignalMonitor(bus.address, "type='signal',member='PropertiesChanged'")
    try:
        a, b = make_client("A"), make_client("B")
        tok = a.token()
        assert b.token_props(tok)["LockedBy"] == {}
        s = a.open_session(tok)
        a.login(s, PIN)
        locked = b.token_props(tok)["LockedBy"]
        assert locked == {"Executable": os.path.realpath(sys.executable), "Uid": os.getuid()}, locked
        wait_until(lambda: any(x["path"] == tok and "LockedBy" in " ".join(mon.lines) for x in mon.signals()),
                   what="PropertiesChanged(LockedBy)")
        a.logout(s)
        wait_until(lambda: b.token_props(tok)["LockedBy"] == {}, what="LockedBy emptied")
    finally:
        mon.stop()


def test_pin_tries_left_is_unknown_where_the_token_does_not_tell(start_daemon, make_client):
    """SoftHSM reports neither final try nor lock for a first wrong PIN: -1, not a guess."""
    start_daemon(caching=True)
    a = make_client("A")
    tok = a.token()
    assert a.token_props(tok)["PinTriesLeft"] == -1
    assert a.error(a.login, a.open_session(tok), "999999") == ERR + "PinIncorrect"
    wait_until(lambda: a.token_props(tok)["UserPinCountLow"] is True, what="count low")
    assert a.token_props(tok)["PinTriesLeft"] == -1
