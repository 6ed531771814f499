"""Malformed and hostile input: the right error, and the daemon keeps serving."""

import shutil
import subprocess

import pytest

from conftest import need

from pincache_client import (digest, ACCESS_DENIED, BUS_NAME, EC_KEY, ERR, INVALID_ARGS, MANAGER,
                             MANAGER_PATH, PIN, RSA_KEY, SESSION, TOKEN, CallError, ay, verify)

MSG = b"pincache bad-input message"
MiB = 1024 * 1024


@pytest.fixture
def setup(start_daemon, make_client, tokens):
    """A daemon, a logged-in witness client W, and the attacker/careless client A."""
    start_daemon(caching=True)
    w, a = make_client("W"), make_client("A")
    tok = w.token()
    sw = w.open_session(tok)
    w.login(sw, PIN)
    sa = a.open_session(tok)
    a.login(sa, PIN)

    def still_serving():
        sig = w.sign(sw, EC_KEY, "ECDSA", digest(MSG))
        verify(tokens.cert("ec"), "ECDSA", MSG, sig)
        assert w.cached() == {tok}

    return w, a, tok, sa, still_serving


def test_wrong_signatures_busctl(setup, busctl):
    w, a, tok, sa, still_serving = setup
    # busctl prints only the error message, so the error name is checked by sending
    # the same body from python-dbus.
    cases = [
        (MANAGER_PATH, MANAGER, "GetTokens", ["s", "extra"], ("extra",)),
        (MANAGER_PATH, MANAGER, "GetCallerState", ["u", "7"], (7,)),
        (tok, TOKEN, "OpenSession", ["b", "true"], (True,)),
        (tok, TOKEN, "ListKeys", ["s", "x"], ("x",)),
        (tok, TOKEN, "SignOnce", ["ayss", "1", "1", "ECDSA", "x"], (ay(b"\x01"), "ECDSA", "x")),
        (tok, TOKEN, "SignOnce", ["s", PIN], (PIN,)),
        (tok, TOKEN, "SignOnce", ["ssss", PIN, "01", "ECDSA", "data"], (PIN, "01", "ECDSA", "data")),
    ]
    for path, iface, method, args, pyargs in cases:
        r = busctl("call", BUS_NAME, path, iface, method, *args)
        assert r.returncode != 0, (method, args, r.stdout)
        assert "Call failed" in r.stderr, (method, args, r.stderr)
        still_serving()
        assert a.error(a.call, path, iface, method, *pyargs, signature=args[0]) == INVALID_ARGS, (method, args)


def test_wrong_signatures_gdbus(setup, gdbus):
    w, a, tok, sa, still_serving = setup
    # gdbus types arguments from introspection, but sends extra ones as given.
    r = gdbus("--object-path", tok, "--method", "org.pincache.Token1.SignOnce",
              "'1'", "[byte 1]", "'ECDSA'", "[byte 1]", "'extra'")
    assert r.returncode != 0
    assert "org.freedesktop.DBus.Error.InvalidArgs" in r.stderr, r.stderr
    still_serving()
    # And gdbus is a working client when the arguments are right.
    r = gdbus("--object-path", MANAGER_PATH, "--method", MANAGER + ".GetTokens")
    assert r.returncode == 0 and tok in r.stdout, r.stderr


def test_wrong_signatures_dbus_send(setup, bus):
    w, a, tok, sa, still_serving = setup
    need(shutil.which("dbus-send"), "dbus-send (dbus-bin) not installed")
    for args in (["int32:42", "boolean:true"], [f"string:{PIN}"], []):
        r = subprocess.run(["dbus-send", f"--bus={bus.address}", "--print-reply", f"--dest={BUS_NAME}",
                            tok, TOKEN + ".SignOnce", *args], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0, args
        assert "Error org.freedesktop.DBus.Error.InvalidArgs" in r.stderr, (args, r.stderr)
        still_serving()


def test_wrong_signatures_on_own_session(setup):
    w, a, tok, sa, still_serving = setup
    for method, args, sig in [("Login", (5,), "i"), ("Login", (PIN, PIN), "ss"),
                              ("Sign", ("01", "ECDSA", "x"), "sss"),
                              ("Sign", (ay(EC_KEY), "ECDSA"), "ays"),
                              ("SignWithPin", (ay(EC_KEY), "ECDSA", ay(digest(MSG))), "aysay"),
                              ("Close", (True,), "b")]:
        assert a.error(a.call, sa, SESSION, method, *args, signature=sig) == INVALID_ARGS, method
        still_serving()


def test_oversized_data(setup, tokens):
    w, a, tok, sa, still_serving = setup
    assert a.error(a.sign, sa, RSA_KEY, "SHA256-RSA-PKCS", b"\0" * (16 * MiB)) == INVALID_ARGS
    still_serving()
    assert a.error(a.sign, sa, RSA_KEY, "SHA256-RSA-PKCS", b"\0" * (MiB + 1)) == INVALID_ARGS
    still_serving()
    # Exactly 1 MiB is allowed.
    data = b"\x5a" * MiB
    sig = a.sign(sa, RSA_KEY, "SHA256-RSA-PKCS", data)
    verify(tokens.cert("rsa"), "SHA256-RSA-PKCS", data, sig)


def test_oversized_pin_and_key_id(setup):
    w, a, tok, sa, still_serving = setup
    s2 = a.open_session(w.token("pincache-second"))
    assert a.error(a.login, s2, "1" * 1_000_000) == INVALID_ARGS
    assert a.error(a.login, s2, "1" * 257) == INVALID_ARGS
    still_serving()
    assert a.cached() == {tok}
    assert a.error(a.sign_once, tok, "1" * 1_000_000, EC_KEY, "ECDSA", digest(MSG)) == INVALID_ARGS
    assert a.error(a.sign_with_pin, sa, "1" * 1_000_000, EC_KEY, "ECDSA", digest(MSG)) == INVALID_ARGS
    assert a.error(a.sign, sa, b"\x01" * 257, "ECDSA", digest(MSG)) == INVALID_ARGS
    still_serving()


def test_unknown_key_and_mechanism(setup):
    w, a, tok, sa, still_serving = setup
    assert a.error(a.sign, sa, b"\x99", "ECDSA", digest(MSG)) == ERR + "KeyNotFound"
    assert a.error(a.sign, sa, b"", "ECDSA", digest(MSG)) in (ERR + "KeyNotFound", INVALID_ARGS)
    assert a.error(a.sign, sa, EC_KEY, "ROT13", MSG) == ERR + "MechanismInvalid"
    assert a.error(a.sign, sa, EC_KEY, "", MSG) == ERR + "MechanismInvalid"
    # An RSA mechanism on an EC key is the key's problem, not an unknown name.
    assert a.error(a.sign, sa, EC_KEY, "SHA256-RSA-PKCS", MSG) is not None
    still_serving()
    assert a.cached() == {tok}


def test_malformed_paths(setup):
    w, a, tok, sa, still_serving = setup
    nonexistent_session = "/org/pincache/session/999999"
    want = None
    try:
        a.call(nonexistent_session, SESSION, "Logout")
    except CallError as e:
        want = (e.name, e.message)
    assert want is not None and want[0] == ACCESS_DENIED
    # Every name directly under /org/pincache/session is "a session path that does not exist".
    for path in ["/org/pincache/session/abc", "/org/pincache/session/0",
                 "/org/pincache/session/18446744073709551617", "/org/pincache/session/_1"]:
        with pytest.raises(CallError) as e:
            a.call(path, SESSION, "Logout")
        assert (e.value.name, e.value.message) == want, path
        still_serving()
    for path in ["/org/pincache/session/1/2", "/org/pincache/token/nope", "/org/pincache/token/999999",
                 "/org/pincache/x", "/"]:
        assert a.error(a.call, path, TOKEN, "OpenSession") is not None, path
        still_serving()
    assert a.error(a.call, MANAGER_PATH, MANAGER, "NoSuchMethod") == "org.freedesktop.DBus.Error.UnknownMethod"
    still_serving()
