"""org.pincache.Cryptoki*1: the proxy's wire interface, driven directly.

Through it every PKCS#11 call the proxy makes; here the daemon side alone, so a proxy
bug and a daemon bug cannot hide each other."""

import re
import struct

import dbus
import pytest
from cryptography.hazmat.primitives import hashes

from pincache_client import (CallError, ERR, PIN, digest, oaep_encrypt, verify)

MANAGER_PATH = "/org/pincache"
CMANAGER = "org.pincache.CryptokiManager1"
CSLOT = "org.pincache.CryptokiSlot1"
CSESSION = "org.pincache.CryptokiSession1"

CKF_RW_SESSION, CKF_SERIAL_SESSION = 0x2, 0x4
CKU_SO, CKU_USER, CKU_CONTEXT_SPECIFIC = 0, 1, 2
CKA_CLASS, CKA_TOKEN, CKA_PRIVATE, CKA_LABEL, CKA_VALUE = 0x0, 0x1, 0x2, 0x3, 0x11
CKA_ID, CKA_ALWAYS_AUTHENTICATE = 0x102, 0x202
CKO_DATA, CKO_PRIVATE_KEY = 0, 3
CKM_ECDSA, CKM_SHA256_RSA_PKCS_PSS, CKM_RSA_PKCS_OAEP, CKM_SHA256 = 0x1041, 0x43, 0x9, 0x250
CKM_SHA_1, CKG_MGF1_SHA1, CKG_MGF1_SHA256, CKZ_DATA_SPECIFIED = 0x220, 1, 2, 1
CKS_RO_PUBLIC, CKS_RW_PUBLIC, CKS_RO_USER, CKS_RW_USER = 0, 2, 1, 3


def ulong(v):
    return struct.pack("<Q", v)


def tmpl(attrs):
    return dbus.Array([dbus.Struct((dbus.UInt64(t), dbus.ByteArray(v)), signature="tay") for t, v in attrs],
                      signature="(tay)")


def mech(mtype, param=b""):
    return dbus.Struct((dbus.UInt64(mtype), dbus.ByteArray(param)), signature="tay")


def ckr(err):
    """The CK_RV an error carries (the last '(0x..)' of its message)."""
    found = re.findall(r"\(0x([0-9a-f]+)\)", err.message)
    assert found, f"no CK_RV in {err.name}: {err.message}"
    return int(found[-1], 16)


class Cryptoki:
    def __init__(self, client):
        self.c = client

    def slots(self):
        return self.c.call(MANAGER_PATH, CMANAGER, "GetSlots")

    def slot(self, label="pincache-demo"):
        return next(p for p, d in self.slots() if d.get("Label") == label)

    def open(self, flags=CKF_SERIAL_SESSION | CKF_RW_SESSION, label="pincache-demo"):
        return self.c.call(self.slot(label), CSLOT, "OpenSession", dbus.UInt64(flags))

    def s(self, session, method, *args):
        return self.c.call(session, CSESSION, method, *args)

    def rv(self, session, method, *args):
        with pytest.raises(CallError) as e:
            self.s(session, method, *args)
        return ckr(e.value)

    def login(self, session, user=CKU_USER, pin=PIN):
        return self.s(session, "Login", dbus.UInt64(user), pin)

    def state(self, session):
        return self.s(session, "GetSessionInfo")[0]

    def find(self, session, attrs, max_=100):
        return self.s(session, "FindObjects", tmpl(attrs), dbus.UInt64(max_))

    def attrs(self, session, handle, types):
        got = self.s(session, "GetAttributes", dbus.UInt64(handle), dbus.Array([dbus.UInt64(t) for t in types], signature="t"))
        return {t: (status, value) for t, status, value in got}

    def key(self, session, key_id):
        found = self.find(session, [(CKA_CLASS, ulong(CKO_PRIVATE_KEY)), (CKA_ID, key_id)])
        assert len(found) == 1, found
        return found[0]

    def sign(self, session, mtype, handle, data, param=b""):
        return self.s(session, "Sign", mech(mtype, param), dbus.UInt64(handle), dbus.ByteArray(data))


@pytest.fixture
def daemon(start_daemon):
    return start_daemon(caching=True, force_login=0x40)


@pytest.fixture
def ck(daemon, make_client):
    return lambda name="client": Cryptoki(make_client(name))


def test_slots_and_mechanisms(ck):
    a = ck()
    slots = dict(a.slots())
    demo = a.slot()
    info = slots[demo]
    assert info["TokenPresent"] is True and info["Label"] == "pincache-demo"
    assert info["TokenFlags"] & 0x400  # CKF_TOKEN_INITIALIZED
    assert any(not d.get("Label") for d in slots.values()), "SoftHSM's spare slot is listed"
    mechs = {m[0]: m for m in a.c.call(demo, CSLOT, "GetMechanisms")}
    assert CKM_ECDSA in mechs and mechs[CKM_ECDSA][3] & 0x800  # CKF_SIGN


def test_session_states_follow_the_callers_login(ck):
    a, b = ck("A"), ck("B")
    sa, sa_ro, sb = a.open(), a.open(CKF_SERIAL_SESSION), b.open()
    assert (a.state(sa), a.state(sa_ro), b.state(sb)) == (CKS_RW_PUBLIC, CKS_RO_PUBLIC, CKS_RW_PUBLIC)
    a.login(sa)
    assert (a.state(sa), a.state(sa_ro), b.state(sb)) == (CKS_RW_USER, CKS_RO_USER, CKS_RW_PUBLIC)
    a.s(sa, "Logout")
    assert a.state(sa) == CKS_RW_PUBLIC
    with pytest.raises(CallError) as e:
        a.c.call(a.slot(), CSLOT, "OpenSession", dbus.UInt64(CKF_RW_SESSION))
    assert ckr(e.value) == 0xb4  # CKR_SESSION_PARALLEL_NOT_SUPPORTED


def test_private_objects_need_the_login_and_handles_survive_brackets(ck, tokens):
    a, b = ck("A"), ck("B")
    sa, sb = a.open(), b.open()
    assert a.find(sa, [(CKA_CLASS, ulong(CKO_PRIVATE_KEY))]) == []
    a.login(sa)
    ec_key = a.key(sa, b"\x01")
    # Another caller's brackets in between: SoftHSM renumbers private objects at each login.
    b.login(sb)
    b.sign(sb, CKM_ECDSA, b.key(sb, b"\x01"), digest(b"b"))
    assert a.key(sa, b"\x01") == ec_key
    for msg in (b"one", b"two"):
        verify(tokens.cert("ec"), "ECDSA", msg, a.sign(sa, CKM_ECDSA, ec_key, digest(msg)))
    assert a.rv(sa, "Sign", mech(CKM_ECDSA), dbus.UInt64(987654), dbus.ByteArray(digest(b"x"))) == 0x60
    a.s(sa, "Logout")
    assert a.rv(sa, "Sign", mech(CKM_ECDSA), dbus.UInt64(ec_key), dbus.ByteArray(digest(b"x"))) == 0x101
    assert a.rv(sa, "Login", dbus.UInt64(CKU_USER), "000000") == 0xa0


def test_pss_parameters_travel_as_struct_bytes(ck, tokens):
    a = ck()
    s = a.open()
    a.login(s)
    key = a.key(s, b"\x02")
    a.login(s, CKU_CONTEXT_SPECIFIC)  # force-login key (nonRepudiation)
    param = ulong(CKM_SHA256) + ulong(CKG_MGF1_SHA256) + ulong(32)
    sig = a.sign(s, CKM_SHA256_RSA_PKCS_PSS, key, b"pss message", param)
    verify(tokens.cert("rsa"), "RSA-PSS-SHA256", b"pss message", sig)


def test_force_login_key_is_always_authenticate_and_needs_a_context_login_each_time(ck, tokens):
    a = ck()
    s = a.open()
    a.login(s)
    rsa, ec = a.key(s, b"\x02"), a.key(s, b"\x01")
    assert a.attrs(s, rsa, [CKA_ALWAYS_AUTHENTICATE])[CKA_ALWAYS_AUTHENTICATE] == (0, b"\x01")
    assert a.attrs(s, ec, [CKA_ALWAYS_AUTHENTICATE])[CKA_ALWAYS_AUTHENTICATE] == (0, b"\x00")
    data = digest(b"m")
    pkcs = bytes.fromhex("3031300d060960864801650304020105000420") + data
    assert a.rv(s, "Sign", mech(0x1), dbus.UInt64(rsa), dbus.ByteArray(pkcs)) == 0x101  # CKM_RSA_PKCS
    assert a.rv(s, "Login", dbus.UInt64(CKU_CONTEXT_SPECIFIC), "000000") == 0xa0
    a.login(s, CKU_CONTEXT_SPECIFIC)
    verify(tokens.cert("rsa"), "RSA-PKCS", b"m", a.sign(s, 0x1, rsa, pkcs))
    assert a.rv(s, "Sign", mech(0x1), dbus.UInt64(rsa), dbus.ByteArray(pkcs)) == 0x101, "one PIN, one signature"
    verify(tokens.cert("ec"), "ECDSA", b"m", a.sign(s, CKM_ECDSA, ec, data))


def test_decrypt_oaep_with_flattened_parameters(ck, tokens):
    a = ck()
    s = a.open()
    a.login(s)
    ct = oaep_encrypt(tokens.cert("rsa"), b"secret", hashes.SHA1)
    param = ulong(CKM_SHA_1) + ulong(CKG_MGF1_SHA1) + ulong(CKZ_DATA_SPECIFIED)
    out = a.s(s, "Decrypt", mech(CKM_RSA_PKCS_OAEP, param), dbus.UInt64(a.key(s, b"\x02")), dbus.ByteArray(ct))
    assert out == b"secret"


def test_session_objects_belong_to_their_caller_and_die_with_their_session(ck):
    # PKCS#11: a session object is visible to every session of the application that made it,
    # to no other application, and is destroyed when the session that made it closes.
    a, b = ck("A"), ck("B")
    sa, sa2, sb = a.open(), a.open(), b.open()
    h = a.s(sa, "CreateObject", tmpl([(CKA_CLASS, ulong(CKO_DATA)), (CKA_TOKEN, b"\x00"), (CKA_PRIVATE, b"\x00"),
                                      (CKA_LABEL, b"mine"), (CKA_VALUE, b"data")]))
    assert a.find(sa, [(CKA_LABEL, b"mine")]) == [h]
    assert a.attrs(sa, h, [CKA_VALUE])[CKA_VALUE] == (0, b"data")
    assert a.find(sa2, [(CKA_LABEL, b"mine")]) == [h]
    assert b.find(sb, [(CKA_LABEL, b"mine")]) == []
    assert b.rv(sb, "GetAttributes", dbus.UInt64(h), dbus.Array([dbus.UInt64(CKA_VALUE)], signature="t")) == 0x82
    a.c.call(sa, "org.pincache.Session1", "Close")
    assert a.find(sa2, [(CKA_LABEL, b"mine")]) == []
    h2 = a.s(sa2, "CreateObject", tmpl([(CKA_CLASS, ulong(CKO_DATA)), (CKA_TOKEN, b"\x00"), (CKA_PRIVATE, b"\x00"),
                                        (CKA_LABEL, b"again")]))
    a.s(sa2, "DestroyObject", dbus.UInt64(h2))
    assert a.find(sa2, [(CKA_LABEL, b"again")]) == []


def test_generated_key_pair_signs_and_verifies(ck):
    # Token objects: in caching mode private *session* objects die at the logout that ends
    # every bracket (PKCS#11 C_Logout), so a generated key that must outlive one call is a token key.
    a = ck()
    s = a.open()
    a.login(s)
    p256 = bytes.fromhex("06082a8648ce3d030107")
    pub, priv = a.s(s, "GenerateKeyPair", mech(0x1040),  # CKM_EC_KEY_PAIR_GEN
                    tmpl([(0x180, p256), (CKA_TOKEN, b"\x01"), (0x10a, b"\x01"), (CKA_ID, b"\x77")]),  # EC_PARAMS, VERIFY
                    tmpl([(CKA_TOKEN, b"\x01"), (0x108, b"\x01"), (CKA_PRIVATE, b"\x01"), (CKA_ID, b"\x77")]))  # SIGN
    data = digest(b"generated")
    sig = a.sign(s, CKM_ECDSA, priv, data)
    a.s(s, "Verify", mech(CKM_ECDSA), dbus.UInt64(pub), dbus.ByteArray(data), dbus.ByteArray(sig))
    bad = bytes([sig[0] ^ 1]) + sig[1:]
    assert a.rv(s, "Verify", mech(CKM_ECDSA), dbus.UInt64(pub), dbus.ByteArray(data), dbus.ByteArray(bad)) == 0xc0


def test_digest_and_random_need_no_login(ck):
    a = ck()
    s = a.open(CKF_SERIAL_SESSION)
    assert a.s(s, "Digest", mech(CKM_SHA256), dbus.ByteArray(b"abc")) == digest(b"abc")
    r = a.s(s, "GenerateRandom", dbus.UInt64(32))
    assert len(r) == 32 and r != a.s(s, "GenerateRandom", dbus.UInt64(32))
    assert a.rv(s, "GenerateRandom", dbus.UInt64(1 << 30)) == 0x7


def test_set_pin_keeps_the_callers_cache_and_purges_the_others(ck, tokens):
    a, b = ck("A"), ck("B")
    sa, sb = a.open(), b.open()
    a.login(sa)
    b.login(sb)
    a.s(sa, "SetPIN", PIN, "24681357")
    ec = a.key(sa, b"\x01")
    verify(tokens.cert("ec"), "ECDSA", b"x", a.sign(sa, CKM_ECDSA, ec, digest(b"x")))
    assert b.state(sb) == CKS_RW_PUBLIC, "B's cached PIN was the old one: purged"
    assert b.rv(sb, "Login", dbus.UInt64(CKU_USER), PIN) == 0xa0
    b.login(sb, pin="24681357")


def test_non_caching_login_holds_the_token(start_daemon, make_client):
    start_daemon(caching=False)
    a, b = Cryptoki(make_client("A")), Cryptoki(make_client("B"))
    sa, sb = a.open(), b.open()
    a.login(sa)
    assert b.rv(sb, "Login", dbus.UInt64(CKU_USER), PIN) == 0x104  # CKR_USER_ANOTHER_ALREADY_LOGGED_IN
    a.s(sa, "Logout")
    b.login(sb)


def test_bad_wire_input_is_arguments_bad(ck):
    a = ck()
    s = a.open()
    huge = tmpl([(CKA_LABEL, b"x")] * 300)
    assert a.rv(s, "FindObjects", huge, dbus.UInt64(10)) == 0x7
    assert a.rv(s, "Sign", mech(CKM_RSA_PKCS_OAEP, b"short"), dbus.UInt64(1), dbus.ByteArray(b"")) == 0x7
    with pytest.raises(CallError) as e:
        a.c.call(s, CSESSION, "Sign", dbus.String("wrong"), signature="s")
    assert e.value.name == "org.freedesktop.DBus.Error.InvalidArgs"
