"""P11_LogoutAfterSign=1: every signature ends the login, in both modes."""

import pytest

from pincache_client import digest, EC_KEY, ERR, PIN, verify

MSG = b"pincache logout-after-sign message"


@pytest.mark.parametrize("caching", [True, False], ids=["caching", "non-caching"])
def test_second_signature_needs_new_login(start_daemon, make_client, tokens, caching):
    start_daemon(caching=caching, logout_after_sign=True)
    a, b = make_client("A"), make_client("B")
    assert a.manager_props()["LogoutAfterSign"] is True
    tok = a.token()
    s = a.open_session(tok)
    a.login(s, PIN)
    sig = a.sign(s, EC_KEY, "ECDSA", digest(MSG))
    verify(tokens.cert("ec"), "ECDSA", MSG, sig)
    st = a.caller_state()
    assert st["Cached"] == [] and st["LoggedIn"] == [] and st["Locked"] == []
    assert a.session_props(s)["LoggedIn"] is False
    assert a.error(a.sign, s, EC_KEY, "ECDSA", digest(MSG)) == ERR + "NotLoggedIn"
    # The forced logout also frees the token for others (matters in non-caching mode).
    sb = b.open_session(tok)
    b.login(sb, PIN)
    # And logging in again works for A (B holds a lock in non-caching mode, so log B out first).
    b.logout(sb)
    a.login(s, PIN)
    sig = a.sign(s, EC_KEY, "ECDSA", digest(MSG + b"2"))
    verify(tokens.cert("ec"), "ECDSA", MSG + b"2", sig)
