"""MaxSessionsPerClient and SignOnce."""

from pincache_client import digest, EC_KEY, ERR, PIN, RSA_KEY, verify

MSG = b"pincache limits message"


def test_max_sessions_per_client(start_daemon, make_client):
    start_daemon(caching=True, extra=["MaxSessionsPerClient=3"])
    a, b = make_client("A"), make_client("B")
    tok, other = a.token(), a.token("pincache-second")
    sessions = [a.open_session(tok), a.open_session(tok), a.open_session(other)]
    assert len(set(sessions)) == 3
    assert a.error(a.open_session, tok) == ERR + "TooManySessions"
    assert a.error(a.open_session, other) == ERR + "TooManySessions"
    assert a.caller_state()["Sessions"] == 3
    # The quota is per client.
    for _ in range(3):
        b.open_session(tok)
    # Closing one frees one.
    a.close_session(sessions[0])
    a.open_session(tok)
    assert a.error(a.open_session, tok) == ERR + "TooManySessions"


def test_sign_once_does_not_cache(start_daemon, make_client, tokens):
    start_daemon(caching=True)
    a = make_client()
    tok = a.token()
    sig = a.sign_once(tok, PIN, EC_KEY, "ECDSA", digest(MSG))
    verify(tokens.cert("ec"), "ECDSA", MSG, sig)
    sig = a.sign_once(tok, PIN, RSA_KEY, "RSA-PSS-SHA256", MSG)
    verify(tokens.cert("rsa"), "RSA-PSS-SHA256", MSG, sig)
    st = a.caller_state()
    assert st["Cached"] == [] and st["LoggedIn"] == [] and st["Sessions"] == 0
    s = a.open_session(tok)
    assert a.error(a.sign, s, EC_KEY, "ECDSA", digest(MSG)) == ERR + "NotLoggedIn"
    assert a.error(a.sign_once, tok, "000000", EC_KEY, "ECDSA", digest(MSG)) == ERR + "PinIncorrect"


def test_sign_once_respects_lock(start_daemon, make_client, tokens):
    """In non-caching mode SignOnce is an operation on the token like any other."""
    start_daemon(caching=False)
    a, b = make_client("A"), make_client("B")
    tok = a.token()
    sa = a.open_session(tok)
    a.login(sa, PIN)
    assert b.error(b.sign_once, tok, PIN, EC_KEY, "ECDSA", digest(MSG)) == ERR + "TokenBusy"
    a.logout(sa)
    sig = b.sign_once(tok, PIN, EC_KEY, "ECDSA", digest(MSG))
    verify(tokens.cert("ec"), "ECDSA", MSG, sig)
