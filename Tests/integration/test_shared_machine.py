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

