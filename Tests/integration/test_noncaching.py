"""Non-caching mode (P11_EnableCachePIN=0): a login locks the token to its caller."""

import pytest

from pincache_client import digest, EC_KEY, ERR, PIN, verify, wait_until

MSG = b"pincache non-caching test message"


@pytest.fixture
def daemon(start_daemon):
    return start_daemon(caching=False)


def locked_by_a(make_client):
    a, b = make_client("A"), make_client("B")
    tok = a.token()
    sa, sb = a.open_session(tok), b.open_session(tok)
    a.login(sa, PIN)
    return a, b, tok, sa, sb


def assert_b_can_login(b, sb, tokens):
    b.login(sb, PIN)
    sig = b.sign(sb, EC_KEY, "ECDSA", digest(MSG))
    verify(tokens.cert("ec"), "ECDSA", MSG, sig)


def test_properties(daemon, make_client):
    c = make_client()
    assert c.manager_props()["CachingMode"] is False
    assert c.caller_state()["CachingMode"] is False


def test_login_locks_token(daemon, make_client, tokens):
    a, b, tok, sa, sb = locked_by_a(make_client)
    st = a.caller_state()
    assert st["Locked"] == [tok] and st["LoggedIn"] == [tok] and st["Cached"] == []
    sig = a.sign(sa, EC_KEY, "ECDSA", digest(MSG))
    verify(tokens.cert("ec"), "ECDSA", MSG, sig)
    assert b.error(b.login, sb, PIN) == ERR + "TokenBusy"
    assert b.error(b.sign, sb, EC_KEY, "ECDSA", digest(MSG)) == ERR + "TokenBusy"
    assert b.caller_state()["Locked"] == []
    # Public data stays readable while the token is locked.
    assert len(b.list_keys(tok)) == 2
    # A still signs after B's attempts: B's failures did not disturb A's login.
    sig = a.sign(sa, EC_KEY, "ECDSA", digest(MSG))
    verify(tokens.cert("ec"), "ECDSA", MSG, sig)


def test_other_token_not_locked(daemon, make_client, tokens):
    a, b, tok, sa, sb = locked_by_a(make_client)
    other = b.token("pincache-second")
    s2 = b.open_session(other)
    b.login(s2, PIN)
    sig = b.sign(s2, EC_KEY, "ECDSA", digest(MSG))
    verify(tokens.cert("ec", "pincache-second"), "ECDSA", MSG, sig)


def test_logout_releases_lock(daemon, make_client, tokens):
    a, b, tok, sa, sb = locked_by_a(make_client)
    a.logout(sa)
    assert a.locked() == set() and a.logged_in() == set()
    assert_b_can_login(b, sb, tokens)
    # Now B holds it.
    assert a.error(a.login, sa, PIN) == ERR + "TokenBusy"


def test_last_session_close_releases_lock(daemon, make_client, tokens):
    a, b, tok, sa, sb = locked_by_a(make_client)
    sa2 = a.open_session(tok)
    a.close_session(sa)
    assert a.locked() == {tok}, "closing one of two sessions must keep the lock"
    assert b.error(b.login, sb, PIN) == ERR + "TokenBusy"
    a.close_session(sa2)
    assert a.locked() == set()
    assert_b_can_login(b, sb, tokens)


def test_disconnect_releases_lock(daemon, make_client, tokens):
    a, b, tok, sa, sb = locked_by_a(make_client)
    a.close()

    def b_logs_in():
        err = b.error(b.login, sb, PIN)
        assert err in (None, ERR + "TokenBusy"), err
        return err is None

    wait_until(b_logs_in, what="A's lock to be released after its disconnect")
    sig = b.sign(sb, EC_KEY, "ECDSA", digest(MSG))
    verify(tokens.cert("ec"), "ECDSA", MSG, sig)
