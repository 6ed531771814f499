"""The proxy's wire (dbus/README.md, "The Cryptoki wire"), driven directly: every PKCS#11 call
the proxy makes, here from the daemon's side alone, so a proxy bug and a daemon bug cannot
hide each other. The socket comes from Manager1.OpenCryptoki; the frames are encoded from the
table the daemon declares (cryptoki_wire.py reads dbus/cryptoki-wire.json)."""

import socket
import struct

import pytest
from cryptography.hazmat.primitives import hashes

import cryptoki_wire
from cryptoki_wire import CALLS, Closed, CryptokiSocket, WireError
from pincache_client import CallError, PIN, digest, oaep_encrypt, verify

CKF_RW_SESSION, CKF_SERIAL_SESSION = 0x2, 0x4
CKU_SO, CKU_USER, CKU_CONTEXT_SPECIFIC = 0, 1, 2
CKA_CLASS, CKA_TOKEN, CKA_PRIVATE, CKA_LABEL, CKA_VALUE = 0x0, 0x1, 0x2, 0x3, 0x11
CKA_ID, CKA_ALWAYS_AUTHENTICATE = 0x102, 0x202
CKO_DATA, CKO_PRIVATE_KEY = 0, 3
CKM_ECDSA, CKM_SHA256_RSA_PKCS_PSS, CKM_RSA_PKCS_OAEP, CKM_SHA256 = 0x1041, 0x43, 0x9, 0x250
CKM_SHA_1, CKG_MGF1_SHA1, CKG_MGF1_SHA256, CKZ_DATA_SPECIFIED = 0x220, 1, 2, 1
CKS_RO_PUBLIC, CKS_RW_PUBLIC, CKS_RO_USER, CKS_RW_USER = 0, 2, 1, 3
SLOT, LABEL, TOKEN_PRESENT, TOKEN_FLAGS = 0, 7, 6, 11  # fields of a GetSlots record


def ulong(v):
    return struct.pack("<Q", v)


def mech(mtype, param=b""):
    return (mtype, param)


class Cryptoki:
    def __init__(self, client):
        self.c = client
        self.w = CryptokiSocket(client)

    def slots(self):
        return self.w.call("GetSlots")[0]

    def slot(self, label="pincache-demo"):
        return next(s[SLOT] for s in self.slots() if s[LABEL] == label)

    def open(self, flags=CKF_SERIAL_SESSION | CKF_RW_SESSION, label="pincache-demo"):
        return self.w.call("OpenSession", self.slot(label), flags)[0]

    def s(self, session, method, *args):
        values = self.w.call(method, session, *args)
        return values[0] if len(values) == 1 else (tuple(values) if values else None)

    def rv(self, session, method, *args):
        with pytest.raises(WireError) as e:
            self.s(session, method, *args)
        return e.value.rv

    def login(self, session, user=CKU_USER, pin=PIN):
        return self.s(session, "Login", user, pin.encode())

    def state(self, session):
        return self.w.call("GetSessionInfo", session)[0]

    def find(self, session, attrs, max_=100):
        return self.s(session, "FindObjects", attrs, max_)

    def attrs(self, session, handle, types):
        got = self.s(session, "GetAttributes", handle, types)
        return {t: (status, value) for t, status, value in got}

    def key(self, session, key_id):
        found = self.find(session, [(CKA_CLASS, ulong(CKO_PRIVATE_KEY)), (CKA_ID, key_id)])
        assert len(found) == 1, found
        return found[0]

    def sign(self, session, mtype, handle, data, param=b""):
        return self.s(session, "Sign", mech(mtype, param), handle, data)


@pytest.fixture
def daemon(start_daemon):
    return start_daemon(caching=True, force_login=0x40)


@pytest.fixture
def ck(daemon, make_client):
    return lambda name="client": Cryptoki(make_client(name))


def test_slots_and_mechanisms(ck):
    a = ck()
    slots = {s[SLOT]: s for s in a.slots()}
    demo = a.slot()
    info = slots[demo]
    assert info[TOKEN_PRESENT] == 1 and info[LABEL] == "pincache-demo"
    assert info[TOKEN_FLAGS] & 0x400  # CKF_TOKEN_INITIALIZED
    assert any(not s[LABEL] for s in slots.values()), "SoftHSM's spare slot is listed"
    mechs = {m[0]: m for m in a.w.call("GetMechanisms", demo)[0]}
    assert CKM_ECDSA in mechs and mechs[CKM_ECDSA][3] & 0x800  # CKF_SIGN


def test_session_states_follow_the_callers_login(ck):
    a, b = ck("A"), ck("B")
    sa, sa_ro, sb = a.open(), a.open(CKF_SERIAL_SESSION), b.open()
    assert (a.state(sa), a.state(sa_ro), b.state(sb)) == (CKS_RW_PUBLIC, CKS_RO_PUBLIC, CKS_RW_PUBLIC)
    a.login(sa)
    assert (a.state(sa), a.state(sa_ro), b.state(sb)) == (CKS_RW_USER, CKS_RO_USER, CKS_RW_PUBLIC)
    a.s(sa, "Logout")
    assert a.state(sa) == CKS_RW_PUBLIC
    with pytest.raises(WireError) as e:
        a.w.call("OpenSession", a.slot(), CKF_RW_SESSION)
    assert e.value.rv == 0xb4  # CKR_SESSION_PARALLEL_NOT_SUPPORTED


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
    assert a.rv(sa, "Sign", mech(CKM_ECDSA), 987654, digest(b"x")) == 0x60
    a.s(sa, "Logout")
    assert a.rv(sa, "Sign", mech(CKM_ECDSA), ec_key, digest(b"x")) == 0x101
    assert a.rv(sa, "Login", CKU_USER, b"000000") == 0xa0


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
    assert a.rv(s, "Sign", mech(0x1), rsa, pkcs) == 0x101  # CKM_RSA_PKCS
    assert a.rv(s, "Login", CKU_CONTEXT_SPECIFIC, b"000000") == 0xa0
    a.login(s, CKU_CONTEXT_SPECIFIC)
    verify(tokens.cert("rsa"), "RSA-PKCS", b"m", a.sign(s, 0x1, rsa, pkcs))
    assert a.rv(s, "Sign", mech(0x1), rsa, pkcs) == 0x101, "one PIN, one signature"
    verify(tokens.cert("ec"), "ECDSA", b"m", a.sign(s, CKM_ECDSA, ec, data))


def test_decrypt_oaep_with_flattened_parameters(ck, tokens):
    a = ck()
    s = a.open()
    a.login(s)
    ct = oaep_encrypt(tokens.cert("rsa"), b"secret", hashes.SHA1)
    param = ulong(CKM_SHA_1) + ulong(CKG_MGF1_SHA1) + ulong(CKZ_DATA_SPECIFIED)
    out = a.s(s, "Decrypt", mech(CKM_RSA_PKCS_OAEP, param), a.key(s, b"\x02"), ct)
    assert out == b"secret"


def test_session_objects_belong_to_their_caller_and_die_with_their_session(ck):
    # PKCS#11: a session object is visible to every session of the application that made it,
    # to no other application, and is destroyed when the session that made it closes.
    a, b = ck("A"), ck("B")
    sa, sa2, sb = a.open(), a.open(), b.open()
    h = a.s(sa, "CreateObject", [(CKA_CLASS, ulong(CKO_DATA)), (CKA_TOKEN, b"\x00"), (CKA_PRIVATE, b"\x00"),
                                 (CKA_LABEL, b"mine"), (CKA_VALUE, b"data")])
    assert a.find(sa, [(CKA_LABEL, b"mine")]) == [h]
    assert a.attrs(sa, h, [CKA_VALUE])[CKA_VALUE] == (0, b"data")
    assert a.find(sa2, [(CKA_LABEL, b"mine")]) == [h]
    assert b.find(sb, [(CKA_LABEL, b"mine")]) == []
    assert b.rv(sb, "GetAttributes", h, [CKA_VALUE]) == 0x82
    a.s(sa, "CloseSession")
    assert a.find(sa2, [(CKA_LABEL, b"mine")]) == []
    h2 = a.s(sa2, "CreateObject", [(CKA_CLASS, ulong(CKO_DATA)), (CKA_TOKEN, b"\x00"), (CKA_PRIVATE, b"\x00"),
                                   (CKA_LABEL, b"again")])
    a.s(sa2, "DestroyObject", h2)
    assert a.find(sa2, [(CKA_LABEL, b"again")]) == []


def test_twin_objects_get_a_handle_each(ck):
    """Issue 13 §2: objects whose class, CKA_ID, label and value are all equal are still two
    objects: two handles, both found, each its own after the other is destroyed or changed,
    and after the logins that renumber the backend's handles (a signature's bracket)."""
    a = ck()
    s = a.open()
    a.login(s)
    twin = [(CKA_CLASS, ulong(CKO_DATA)), (CKA_TOKEN, b"\x01"), (CKA_PRIVATE, b"\x01"), (CKA_LABEL, b"twin"),
            (CKA_VALUE, b"same")]
    h1 = a.s(s, "CreateObject", twin)
    h2 = a.s(s, "CreateObject", twin)
    h3 = a.s(s, "CreateObject", twin)
    assert len({h1, h2, h3}) == 3, (h1, h2, h3)
    assert sorted(a.find(s, [(CKA_LABEL, b"twin")])) == sorted([h1, h2, h3])
    a.sign(s, CKM_ECDSA, a.key(s, b"\x01"), digest(b"a bracket in between"))
    assert sorted(a.find(s, [(CKA_LABEL, b"twin")])) == sorted([h1, h2, h3])
    a.s(s, "DestroyObject", h2)
    assert sorted(a.find(s, [(CKA_LABEL, b"twin")])) == sorted([h1, h3])
    assert a.rv(s, "GetAttributes", h2, [CKA_VALUE]) == 0x82  # CKR_OBJECT_HANDLE_INVALID
    a.s(s, "SetAttributes", h3, [(CKA_LABEL, b"no longer a twin")])
    assert a.find(s, [(CKA_LABEL, b"twin")]) == [h1]
    assert a.find(s, [(CKA_LABEL, b"no longer a twin")]) == [h3]
    assert a.attrs(s, h1, [CKA_VALUE])[CKA_VALUE] == (0, b"same")
    for h in (h1, h3):
        a.s(s, "DestroyObject", h)
    assert a.find(s, [(CKA_CLASS, ulong(CKO_DATA)), (CKA_VALUE, b"same")]) == []


def test_generated_key_pair_signs_and_verifies(ck):
    # Token objects: in caching mode private *session* objects die at the logout that ends
    # every bracket (PKCS#11 C_Logout), so a generated key that must outlive one call is a token key.
    a = ck()
    s = a.open()
    a.login(s)
    p256 = bytes.fromhex("06082a8648ce3d030107")
    pub, priv = a.s(s, "GenerateKeyPair", mech(0x1040),  # CKM_EC_KEY_PAIR_GEN
                    [(0x180, p256), (CKA_TOKEN, b"\x01"), (0x10a, b"\x01"), (CKA_ID, b"\x77")],  # EC_PARAMS, VERIFY
                    [(CKA_TOKEN, b"\x01"), (0x108, b"\x01"), (CKA_PRIVATE, b"\x01"), (CKA_ID, b"\x77")])  # SIGN
    data = digest(b"generated")
    sig = a.sign(s, CKM_ECDSA, priv, data)
    a.s(s, "Verify", mech(CKM_ECDSA), pub, data, sig)
    bad = bytes([sig[0] ^ 1]) + sig[1:]
    assert a.rv(s, "Verify", mech(CKM_ECDSA), pub, data, bad) == 0xc0


def test_digest_and_random_need_no_login(ck):
    a = ck()
    s = a.open(CKF_SERIAL_SESSION)
    assert a.s(s, "Digest", mech(CKM_SHA256), b"abc") == digest(b"abc")
    r = a.s(s, "GenerateRandom", 32)
    assert len(r) == 32 and r != a.s(s, "GenerateRandom", 32)
    assert a.rv(s, "GenerateRandom", 1 << 30) == 0x7


def test_set_pin_keeps_the_callers_cache_and_purges_the_others(ck, tokens):
    a, b = ck("A"), ck("B")
    sa, sb = a.open(), b.open()
    a.login(sa)
    b.login(sb)
    a.s(sa, "SetPIN", PIN.encode(), b"24681357")
    ec = a.key(sa, b"\x01")
    verify(tokens.cert("ec"), "ECDSA", b"x", a.sign(sa, CKM_ECDSA, ec, digest(b"x")))
    assert b.state(sb) == CKS_RW_PUBLIC, "B's cached PIN was the old one: purged"
    assert b.rv(sb, "Login", CKU_USER, PIN.encode()) == 0xa0
    b.login(sb, pin="24681357")


def test_non_caching_login_holds_the_token(start_daemon, make_client):
    start_daemon(caching=False)
    a, b = Cryptoki(make_client("A")), Cryptoki(make_client("B"))
    sa, sb = a.open(), b.open()
    a.login(sa)
    assert b.rv(sb, "Login", CKU_USER, PIN.encode()) == 0x104  # CKR_USER_ANOTHER_ALREADY_LOGGED_IN
    a.s(sa, "Logout")
    b.login(sb)


def test_malformed_frames_end_the_socket_and_nothing_else(ck, make_client):
    a = ck()
    s = a.open()
    # A mechanism parameter the daemon cannot take is an answer, not a broken frame.
    assert a.rv(s, "Sign", mech(CKM_RSA_PKCS_OAEP, b"short"), 1, b"") == 0x71
    cases = [
        # 300 template entries: over the table's cap of 256, refused by the decoder.
        cryptoki_wire.request("FindObjects", s, [(CKA_LABEL, b"x")] * 300, 10, tag=50, check=False),
        # A body that does not match its call's fields (a string where a number is declared).
        cryptoki_wire.frame(51, CALLS["Sign"]["id"], cryptoki_wire.REQUEST, struct.pack("<I", 5) + b"wrong"),
        # A call id the table does not have.
        cryptoki_wire.frame(52, 9999, cryptoki_wire.REQUEST, b""),
        # A length over the frame cap.
        struct.pack("<IIHBB", (16 << 20) + (64 << 10) + 1, 53, 17, 0, 0),
    ]
    for bad in cases:
        w = CryptokiSocket(make_client("bad"))
        w.send_raw(bad)
        assert w.is_closed(), bad[:16].hex()
    # Only that socket: the first one still works.
    assert a.state(s) == CKS_RW_PUBLIC


def test_a_socket_reaches_only_its_callers_sessions(ck):
    a, b = ck("A"), ck("B")
    sa = a.open()
    # Another caller's session number answers as one that does not exist.
    assert b.rv(sa, "GetSessionInfo") == 0xb3
    assert b.rv(987654, "GetSessionInfo") == 0xb3
    assert a.state(sa) == CKS_RW_PUBLIC


def test_one_socket_per_connection_bound_to_its_environment(daemon, make_client):
    c = make_client("owner")
    w = CryptokiSocket(c)
    with pytest.raises(Exception) as e:
        CryptokiSocket(c)
    assert "LimitsExceeded" in str(e.value)
    s = w.call("OpenSession", next(x[SLOT] for x in w.call("GetSlots")[0] if x[LABEL] == "pincache-demo"), 6)[0]
    w.call("Login", s, CKU_USER, PIN.encode())
    watcher = make_client("watcher")
    assert watcher.statistics()["CryptokiSockets"] >= 1
    # Closing the socket ends the environment: its sessions and cached PIN go with it.
    w.close()
    from pincache_client import wait_until
    wait_until(lambda: watcher.statistics()["CachedPINs"] == 0, what="the cached PIN wiped")
    with pytest.raises(CallError):
        c.caller_state()
    # Leaving the bus closes the socket.
    d = make_client("leaver")
    wd = CryptokiSocket(d)
    d.close()
    assert wd.is_closed(10)


def test_statistics_count_the_wire(daemon, make_client):
    a = Cryptoki(make_client())
    before = a.c.statistics()["CryptokiCalls"]
    a.open()
    assert a.c.statistics()["CryptokiCalls"] >= before + 2  # GetSlots, OpenSession


@pytest.mark.parametrize("mtype,param", [
    (0x1087, b"\x41" * 40),            # CKM_AES_GCM: CK_GCM_PARAMS holds pointers
    (0x1050, b"\x41" * 40),            # CKM_ECDH1_DERIVE: pointers
    (CKM_SHA256_RSA_PKCS_PSS, b"\x00" * 8),   # a PSS struct cut short: the module would read past it
    (CKM_RSA_PKCS_OAEP, ulong(CKM_SHA_1) + ulong(CKG_MGF1_SHA1) + ulong(0)),  # source not CKZ_DATA_SPECIFIED
])
def test_parameters_that_could_carry_pointers_are_refused(ck, mtype, param):
    a = ck()
    s = a.open()
    a.login(s)
    key = a.key(s, b"\x01")
    assert a.rv(s, "Sign", mech(mtype, param), key, b"x" * 32) == 0x71
    # and the daemon is still there
    assert len(a.sign(s, CKM_ECDSA, key, digest(b"still"))) == 64


def test_array_attributes_travel_flattened_and_a_malformed_one_never_reaches_the_module(ck):
    """CKA_WRAP_TEMPLATE and friends hold nested templates whose values C keeps behind pointers:
    on the wire they travel flattened (type, length, value per entry; dbus/README.md), and the
    daemon builds the C array with its own pointers. Sent straight to the socket, bytes laid out
    as C would lay out a pointer and a count do not parse, nor does an array inside an array,
    and both are refused before any module sees them; a well-formed template is kept and reads
    back as sent."""
    a = ck()
    s = a.open()
    a.login(s)
    wrap_template = 0x40000211
    pointer_like = ulong(0x7FFF_DEAD_BEEF) + ulong(1)
    nested_array = ulong(0x40000212) + ulong(0)
    for value in (pointer_like, nested_array):
        assert a.rv(s, "CreateObject", [(CKA_CLASS, ulong(CKO_DATA)), (wrap_template, value)]) == 0x13
        assert a.rv(s, "FindObjects", [(wrap_template, value)], 10) == 0x13
    assert a.state(s) == CKS_RW_USER
    flattened = ulong(0x100) + ulong(8) + ulong(0x10) + ulong(0x162) + ulong(1) + b"\x01"  # key type, extractable
    key = a.s(s, "CreateObject", [(CKA_CLASS, ulong(4)), (0x100, ulong(0x1F)), (CKA_TOKEN, b"\x00"),
                                  (CKA_VALUE, bytes(16)), (wrap_template, flattened)])
    assert a.attrs(s, key, [wrap_template, CKA_CLASS]) == {wrap_template: (0, flattened), CKA_CLASS: (0, ulong(4))}
    a.s(s, "DestroyObject", key)


def test_private_key_descriptions_survive_changes_through_the_daemon_with_their_handle(ck, tokens):
    """Issue 14 §3 and issue 13 §3: a private key's description is read in its search's bracket
    and served from there; a change through the daemon shows at once and the key keeps its
    handle; a sensitive attribute is refused as the backend refuses it, never snapshotted."""
    a = ck("A")
    s = a.open()
    a.login(s)
    key = a.key(s, b"\x01")
    assert a.attrs(s, key, [CKA_LABEL])[CKA_LABEL] == (0, b"ec-key")
    try:
        a.s(s, "SetAttributes", key, [(CKA_LABEL, b"renamed-here")])
        assert a.attrs(s, key, [CKA_LABEL])[CKA_LABEL] == (0, b"renamed-here")
        assert a.key(s, b"\x01") == key
        assert a.attrs(s, key, [CKA_LABEL])[CKA_LABEL] == (0, b"renamed-here")
        verify(tokens.cert("ec"), "ECDSA", b"still the key", a.sign(s, CKM_ECDSA, key, digest(b"still the key")))
        status, _ = a.attrs(s, key, [CKA_VALUE])[CKA_VALUE]  # the private scalar
        assert status == 0x11  # CKR_ATTRIBUTE_SENSITIVE, as SoftHSM says
    finally:
        a.s(s, "SetAttributes", key, [(CKA_LABEL, b"ec-key")])


def test_pin_flags_are_fresh_at_the_next_get_slots(ck):
    """Issue 13 §9: a wrong PIN's CKF_USER_PIN_COUNT_LOW shows in the very next C_GetTokenInfo
    (GetSlots), and a right PIN clears it as promptly, not a poll later."""
    a = ck("A")
    s = a.open()
    demo = a.slot()

    def flags():
        return next(x for x in a.slots() if x[SLOT] == demo)[TOKEN_FLAGS]
    assert flags() & 0x10000 == 0
    assert a.rv(s, "Login", CKU_USER, b"000000") == 0xa0
    assert flags() & 0x10000, hex(flags())  # CKF_USER_PIN_COUNT_LOW
    a.login(s)
    assert flags() & 0x10000 == 0, hex(flags())


def test_so_and_user_logins_follow_pkcs11s_session_rules(ck):
    """Issue 13 §6: an SO login needs every session of the application read-write
    (CKR_SESSION_READ_ONLY_EXISTS), excludes a user login (CKR_USER_ANOTHER_ALREADY_LOGGED_IN,
    both ways) and read-only sessions while it lasts (CKR_SESSION_READ_WRITE_SO_EXISTS)."""
    from pincache_client import SO_PIN
    a = ck("A")
    rw, ro = a.open(), a.open(CKF_SERIAL_SESSION)
    assert a.rv(rw, "Login", CKU_SO, SO_PIN.encode()) == 0xb7
    a.s(ro, "CloseSession")
    a.login(rw)
    assert a.rv(rw, "Login", CKU_SO, SO_PIN.encode()) == 0x104
    a.s(rw, "Logout")
    a.s(rw, "Login", CKU_SO, SO_PIN.encode())
    assert a.state(rw) == 4  # CKS_RW_SO_FUNCTIONS
    with pytest.raises(WireError) as e:
        a.w.call("OpenSession", a.slot(), CKF_SERIAL_SESSION)
    assert e.value.rv == 0xb8
    assert a.rv(rw, "Login", CKU_USER, PIN.encode()) == 0x104
    a.s(rw, "Logout")
    a.login(rw)


def test_an_exclusive_login_leaves_others_public_reads_alone(start_daemon, make_client):
    """Issue 13 §4: in non-caching mode the holder's login stops other callers' logins and
    changes, not their public reads; and those never see the holder's private objects."""
    start_daemon(caching=False)
    a, b = Cryptoki(make_client("A")), Cryptoki(make_client("B"))
    sa, sb = a.open(), b.open()
    public_before = sorted(b.find(sb, []))
    a.login(sa)
    assert a.find(sa, [(CKA_CLASS, ulong(CKO_PRIVATE_KEY))]), "the holder sees its private keys"
    assert sorted(b.find(sb, [])) == public_before
    assert b.find(sb, [(CKA_CLASS, ulong(CKO_PRIVATE_KEY))]) == []
    assert b.find(sb, [(CKA_PRIVATE, b"\x01")]) == []
    cert = b.find(sb, [(CKA_CLASS, ulong(1))])[0]  # CKO_CERTIFICATE
    assert b.attrs(sb, cert, [CKA_VALUE])[CKA_VALUE][0] == 0
    assert b.s(sb, "Digest", mech(CKM_SHA256), b"abc") == digest(b"abc")
    assert b.rv(sb, "Login", CKU_USER, PIN.encode()) == 0x104
    assert b.rv(sb, "CreateObject", [(CKA_CLASS, ulong(CKO_DATA)), (CKA_TOKEN, b"\x00")]) != 0
    a.s(sa, "Logout")
    b.login(sb)
    assert b.find(sb, [(CKA_CLASS, ulong(CKO_PRIVATE_KEY))])
