"""PIN caching mode (P11_EnableCachePIN=1): one cache environment per connection."""

import os

from cryptography.hazmat.primitives import hashes

import pytest

from pincache_client import (CallError, digest, EC_KEY, ERR, PIN, RSA_KEY, input_for, oaep_encrypt, verify,
                             wait_until)

MSG = b"pincache caching-mode test message"


@pytest.fixture
def daemon(start_daemon):
    return start_daemon(caching=True)


def sign_ec(client, session, tokens, message=MSG):
    sig = client.sign(session, EC_KEY, "ECDSA", digest(message))
    verify(tokens.cert("ec"), "ECDSA", message, sig)
    return sig


def test_manager_properties(daemon, make_client):
    props = make_client().manager_props()
    assert props["CachingMode"] is True
    assert props["LogoutAfterSign"] is False
    assert props["ForceLoginBeforeSignKeyUsage"] == 0
    assert isinstance(props["Version"], str) and props["Version"]


def test_tokens_listed_with_properties(daemon, make_client, tokens):
    c = make_client()
    paths = c.tokens()
    assert all(p.startswith("/org/pincache/token/") for p in paths)
    props = {p: c.token_props(p) for p in paths}
    labels = sorted(v["Label"] for v in props.values() if v["Recognized"])
    assert labels == ["pincache-demo", "pincache-second"]
    # SoftHSM's spare uninitialised slot is listed but not usable.
    assert any(not v["Recognized"] for v in props.values())
    demo = props[c.token()]
    assert demo["Present"] is True
    assert demo["Manufacturer"] == "SoftHSM project"
    assert demo["Model"] == "SoftHSM v2"
    assert demo["Kind"] == "software"
    assert demo["Module"].endswith("libsofthsm2.so")
    assert demo["ProtectedAuthenticationPath"] is False
    assert demo["PinMinLength"] == 4 and demo["PinMaxLength"] == 255
    assert (demo["UserPinCountLow"], demo["UserPinFinalTry"], demo["UserPinLocked"]) == (False, False, False)
    assert len(demo["Serial"]) == 16


def test_list_keys(daemon, make_client, tokens):
    c = make_client()
    tok = c.token()
    keys = {k["Id"]: k for k in c.list_keys(tok)}
    assert set(keys) == {EC_KEY, RSA_KEY}
    ec, rsa = keys[EC_KEY], keys[RSA_KEY]
    assert (ec["Label"], ec["KeyType"], ec["Bits"]) == ("ec-key", "EC", 256)
    assert (rsa["Label"], rsa["KeyType"], rsa["Bits"]) == ("rsa-nonrep", "RSA", 2048)
    assert ec["CanSign"] and rsa["CanSign"] and rsa["CanDecrypt"]
    assert ec["KeyUsage"] == 0x80
    assert rsa["KeyUsage"] == 0xC0
    assert ec["AlwaysAuthenticate"] is False and rsa["AlwaysAuthenticate"] is False
    assert ec["Certificate"] == tokens.cert_path("ec").read_bytes()
    assert rsa["Certificate"] == tokens.cert_path("rsa").read_bytes()


def test_login_caches_and_signs_without_pin(daemon, make_client, tokens):
    a = make_client("A")
    tok = a.token()
    s = a.open_session(tok)
    assert a.session_props(s) == {"Token": tok, "LoggedIn": False}
    assert a.error(a.sign, s, EC_KEY, "ECDSA", digest(MSG)) == ERR + "NotLoggedIn"
    a.login(s, PIN)
    assert a.session_props(s)["LoggedIn"] is True
    st = a.caller_state()
    assert st["Cached"] == [tok] and st["LoggedIn"] == [tok] and st["Locked"] == []
    assert st["Sessions"] == 1 and st["CachingMode"] is True
    assert os.path.basename(st["Executable"]).startswith("python3")
    s1 = sign_ec(a, s, tokens)
    s2 = sign_ec(a, s, tokens, MSG + b" again")
    assert s1 != s2
    # Still cached after signing (no LogoutAfterSign).
    assert a.cached() == {tok}
    assert a.error(a.login, s, PIN) == ERR + "AlreadyLoggedIn"


def test_two_callers_keep_separate_caches(daemon, make_client, tokens):
    a, b = make_client("A"), make_client("B")
    tok = a.token()
    sa, sb = a.open_session(tok), b.open_session(tok)
    a.login(sa)
    sign_ec(a, sa, tokens)
    assert b.error(b.sign, sb, EC_KEY, "ECDSA", digest(MSG)) == ERR + "NotLoggedIn"
    assert b.cached() == set() and b.logged_in() == set()
    assert b.session_props(sb)["LoggedIn"] is False
    b.login(sb)
    sign_ec(b, sb, tokens)
    sign_ec(a, sa, tokens)
    assert a.cached() == {tok} and b.cached() == {tok}


def test_cache_is_per_token(daemon, make_client, tokens):
    a = make_client("A")
    demo, second = a.token(), a.token("pincache-second")
    s1, s2 = a.open_session(demo), a.open_session(second)
    a.login(s1)
    assert a.cached() == {demo}
    assert a.error(a.sign, s2, EC_KEY, "ECDSA", digest(MSG)) == ERR + "NotLoggedIn"
    a.login(s2)
    sig = a.sign(s2, EC_KEY, "ECDSA", digest(MSG))
    verify(tokens.cert("ec", "pincache-second"), "ECDSA", MSG, sig)
    a.logout(s1)
    assert a.cached() == {second}


def test_sessions_of_a_caller_share_login(daemon, make_client, tokens):
    a = make_client("A")
    tok = a.token()
    s1, s2 = a.open_session(tok), a.open_session(tok)
    a.login(s1)
    assert a.session_props(s2)["LoggedIn"] is True
    sign_ec(a, s2, tokens)
    assert a.caller_state()["Sessions"] == 2
    # Closing one of two sessions keeps the cache: it is the last one that counts.
    a.close_session(s1)
    assert a.cached() == {tok}
    sign_ec(a, s2, tokens)


def test_logout_clears_only_own_cache(daemon, make_client, tokens):
    a, b = make_client("A"), make_client("B")
    tok = a.token()
    sa, sb = a.open_session(tok), b.open_session(tok)
    a.login(sa)
    b.login(sb)
    a.logout(sa)
    assert a.cached() == set() and a.logged_in() == set()
    assert a.error(a.sign, sa, EC_KEY, "ECDSA", digest(MSG)) == ERR + "NotLoggedIn"
    assert b.cached() == {tok}
    sign_ec(b, sb, tokens)


def test_last_session_close_clears_only_own_cache(daemon, make_client, tokens):
    a, b = make_client("A"), make_client("B")
    tok = a.token()
    sa, sb = a.open_session(tok), b.open_session(tok)
    a.login(sa)
    b.login(sb)
    a.close_session(sa)
    assert a.cached() == set()
    assert a.caller_state()["Sessions"] == 0
    sa2 = a.open_session(tok)
    assert a.session_props(sa2)["LoggedIn"] is False
    assert a.error(a.sign, sa2, EC_KEY, "ECDSA", digest(MSG)) == ERR + "NotLoggedIn"
    assert b.cached() == {tok}
    sign_ec(b, sb, tokens)


def test_disconnect_clears_only_own_cache(daemon, make_client, tokens):
    a, b = make_client("A"), make_client("B")
    tok = a.token()
    sa, sb = a.open_session(tok), b.open_session(tok)
    a.login(sa)
    b.login(sb)
    a_name = a.unique_name
    before = b.statistics()
    assert before["CachedPINs"] == 2 and before["Environments"] == 2 and before["Sessions"] == 2
    a.close()
    wait_until(lambda: b.gone_from_bus(a), what=f"{a_name} to leave the bus")
    # A's environment, its session and its PIN are gone; B's are untouched.
    # Its environment goes first, its sessions on the token's worker right after.
    wait_until(lambda: b.statistics()["Environments"] == 1 and b.statistics()["Sessions"] == 1,
               what="A's environment and session destroyed")
    after = b.statistics()
    assert after["CachedPINs"] == 1 and after["Sessions"] == 1
    assert b.cached() == {tok}
    sign_ec(b, sb, tokens)
    # A new connection from the same process is a new, empty environment.
    a2 = make_client("A2")
    assert a2.cached() == set() and a2.caller_state()["Sessions"] == 0


def test_flush_caches_clears_everyone(daemon, make_client, tokens):
    a, b = make_client("A"), make_client("B")
    tok = a.token()
    sa, sb = a.open_session(tok), b.open_session(tok)
    a.login(sa)
    b.login(sb)
    a.flush()  # no polkit on a private bus: allowed
    assert a.cached() == set() and b.cached() == set()
    assert b.error(b.sign, sb, EC_KEY, "ECDSA", digest(MSG)) == ERR + "NotLoggedIn"


def test_wrong_pin(daemon, make_client):
    a = make_client("A")
    s = a.open_session(a.token())
    assert a.error(a.login, s, "000000") == ERR + "PinIncorrect"
    assert a.cached() == set()
    a.login(s, PIN)


@pytest.mark.parametrize("mechanism,key", [
    ("ECDSA", EC_KEY), ("ECDSA-SHA256", EC_KEY), ("ECDSA-SHA384", EC_KEY), ("ECDSA-SHA512", EC_KEY),
    ("RSA-PKCS", RSA_KEY), ("SHA256-RSA-PKCS", RSA_KEY), ("SHA384-RSA-PKCS", RSA_KEY),
    ("SHA512-RSA-PKCS", RSA_KEY), ("RSA-PSS-SHA256", RSA_KEY), ("RSA-PSS-SHA384", RSA_KEY),
    ("RSA-PSS-SHA512", RSA_KEY)])
def test_mechanisms(daemon, make_client, tokens, mechanism, key):
    a = make_client()
    s = a.open_session(a.token())
    a.login(s)
    sig = a.sign(s, key, mechanism, input_for(mechanism, MSG))
    verify(tokens.cert("ec" if key == EC_KEY else "rsa"), mechanism, MSG, sig)


def test_decrypt_oaep(daemon, make_client, tokens):
    a = make_client()
    s = a.open_session(a.token())
    secret = b"pincache OAEP plaintext"
    ct = oaep_encrypt(tokens.cert("rsa"), secret, hashes.SHA1)
    assert a.error(a.decrypt, s, RSA_KEY, "RSA-OAEP-SHA1", ct) == ERR + "NotLoggedIn"
    a.login(s)
    assert a.decrypt(s, RSA_KEY, "RSA-OAEP-SHA1", ct) == secret
    assert a.cached() == {a.token()}


def test_decrypt_oaep_sha256_passes_the_backend_verdict_through(daemon, make_client, tokens):
    # SoftHSM 2.6 implements OAEP with SHA-1 only: the daemon must hand its exact code back.
    a = make_client()
    s = a.open_session(a.token())
    a.login(s)
    ct = oaep_encrypt(tokens.cert("rsa"), b"x")
    with pytest.raises(CallError) as e:
        a.decrypt(s, RSA_KEY, "RSA-OAEP-SHA256", ct)
    assert e.value.name == ERR + "BackendError"
    assert "CKR_ARGUMENTS_BAD (0x7)" in e.value.message
