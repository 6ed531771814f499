"""A session belongs to the connection that opened it."""

from pincache_client import digest, ACCESS_DENIED, EC_KEY, PIN, SESSION, CallError, verify

MSG = b"pincache isolation message"


def reply(client, path, method, *args):
    try:
        client.call(path, SESSION, method, *args)
    except CallError as e:
        return (e.name, e.message)
    return None


def test_other_callers_session_is_indistinguishable_from_missing(start_daemon, make_client, tokens):
    start_daemon(caching=True)
    a, b = make_client("A"), make_client("B")
    tok = a.token()
    sa = a.open_session(tok)
    a.login(sa, PIN)
    missing = "/org/pincache/session/999999"
    for method, args in [("Login", (PIN,)), ("Logout", ()), ("Close", ()),
                         ("Sign", (EC_KEY, "ECDSA", digest(MSG))),
                         ("SignWithPin", (PIN, EC_KEY, "ECDSA", digest(MSG))),
                         ("Decrypt", (b"\x02", "RSA-OAEP-SHA256", b"x" * 256))]:
        got = reply(b, sa, method, *args)
        want = reply(b, missing, method, *args)
        assert got is not None and got[0] == ACCESS_DENIED, (method, got)
        assert got == want, (method, got, want)
    # Properties too.
    got = reply_props(b, sa)
    assert got is not None and got[0] == ACCESS_DENIED, got
    assert got == reply_props(b, missing)
    # B's attempts changed nothing for A.
    assert a.session_props(sa)["LoggedIn"] is True
    sig = a.sign(sa, EC_KEY, "ECDSA", digest(MSG))
    verify(tokens.cert("ec"), "ECDSA", MSG, sig)


def reply_props(client, path):
    try:
        client.get_all(path, SESSION)
    except CallError as e:
        return (e.name, e.message)
    return None
