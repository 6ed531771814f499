"""ForceLoginBeforeSignKeyUsage=0x40: non-repudiation keys need the PIN for every signature."""

import pytest

from pincache_client import digest, EC_KEY, ERR, PIN, RSA_KEY, verify

MSG = b"pincache force-login message"


@pytest.fixture
def daemon(start_daemon):
    return start_daemon(caching=True, force_login=0x40)


def test_property_and_flags(daemon, make_client):
    c = make_client()
    assert c.manager_props()["ForceLoginBeforeSignKeyUsage"] == 0x40
    tok = c.token()
    assert c.key(tok, RSA_KEY)["AlwaysAuthenticate"] is True
    assert c.key(tok, EC_KEY)["AlwaysAuthenticate"] is False


def test_nonrep_key_refuses_cached_pin(daemon, make_client, tokens):
    a = make_client()
    s = a.open_session(a.token())
    a.login(s, PIN)
    assert a.error(a.sign, s, RSA_KEY, "SHA256-RSA-PKCS", MSG) == ERR + "PinRequired"
    sig = a.sign_with_pin(s, PIN, RSA_KEY, "SHA256-RSA-PKCS", MSG)
    verify(tokens.cert("rsa"), "SHA256-RSA-PKCS", MSG, sig)
    # Every signature needs it again.
    assert a.error(a.sign, s, RSA_KEY, "SHA256-RSA-PKCS", MSG) == ERR + "PinRequired"
    sig = a.sign_with_pin(s, PIN, RSA_KEY, "RSA-PSS-SHA256", MSG)
    verify(tokens.cert("rsa"), "RSA-PSS-SHA256", MSG, sig)
    # The EC key (digitalSignature only) still signs from the cache.
    sig = a.sign(s, EC_KEY, "ECDSA", digest(MSG))
    verify(tokens.cert("ec"), "ECDSA", MSG, sig)
    assert a.cached() == {a.token()}


def test_sign_with_wrong_pin(daemon, make_client):
    a = make_client()
    s = a.open_session(a.token())
    a.login(s, PIN)
    assert a.error(a.sign_with_pin, s, "999999", RSA_KEY, "SHA256-RSA-PKCS", MSG) == ERR + "PinIncorrect"


def test_sign_with_pin_needs_login(daemon, make_client):
    a = make_client()
    s = a.open_session(a.token())
    assert a.error(a.sign_with_pin, s, PIN, RSA_KEY, "SHA256-RSA-PKCS", MSG) == ERR + "NotLoggedIn"
    # The context-specific PIN is never cached.
    assert a.cached() == set()


def test_without_force_login_nonrep_key_uses_cache(start_daemon, make_client, tokens):
    start_daemon(caching=True, force_login=0)
    a = make_client()
    tok = a.token()
    assert a.key(tok, RSA_KEY)["AlwaysAuthenticate"] is False
    s = a.open_session(tok)
    a.login(s, PIN)
    sig = a.sign(s, RSA_KEY, "SHA256-RSA-PKCS", MSG)
    verify(tokens.cert("rsa"), "SHA256-RSA-PKCS", MSG, sig)
