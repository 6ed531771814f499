"""The peer channel and the fast path (dbus/README.md): proxy calls that skip the bus
daemon's relay. A channel speaks for the bus name whose one-time ticket bound it, only
from that name's own process; it refuses PIN-carrying calls; it closes when its caller
leaves the bus; and without one the proxy works over the bus as before. The fast path
(a socket handed over the bus) carries signatures and decryptions for its caller's own
sessions only, with the D-Bus path's errors, and drops a malformed frame's sender."""

import socket
import struct
import subprocess
import sys
import textwrap
import time

import dbus
import dbus.connection
import pytest

from conftest import need
from pincache_client import BUS_NAME, PIN, CallError, digest, verify, wait_until
from test_proxy_support import Host, host, proxy_host, proxy_lib  # noqa: F401 (fixtures)

MANAGER_PATH = "/org/pincache"
CMANAGER = "org.pincache.CryptokiManager1"
CSLOT = "org.pincache.CryptokiSlot1"
CSESSION = "org.pincache.CryptokiSession1"
CHANNEL = "org.pincache.Channel1"
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
LABEL = "pincache-demo"
MSG = b"sent over the peer channel"
CKF_SERIAL_SESSION = 4


def channel_count(client):
    return int(client.statistics()["Channels"])


def peer(address):
    """A raw peer-to-peer connection to the daemon's channel socket (no bus, no Hello)."""
    return dbus.connection.Connection(address)


def peer_call(conn, path, interface, method, signature="", args=()):
    try:
        return conn.call_blocking(None, path, interface, method, signature, args, timeout=10)
    except dbus.exceptions.DBusException as e:
        raise CallError(e.get_dbus_name(), e.get_dbus_message()) from None


def bind(conn, ticket):
    return peer_call(conn, MANAGER_PATH, CHANNEL, "Bind", "ay", (dbus.ByteArray(ticket),))


def open_channel(client):
    address, ticket = client.call(MANAGER_PATH, CMANAGER, "OpenChannel")
    assert str(address).startswith("unix:"), address
    return str(address), bytes(ticket)


def slot_of(client, label=LABEL):
    return next(p for p, d in client.call(MANAGER_PATH, CMANAGER, "GetSlots") if d.get("Label") == label)


def test_proxy_uses_a_channel_that_closes_with_it(start_daemon, host, make_client, tokens):
    d = start_daemon(caching=True)
    assert "peer channels on unix:" in d.stderr_text()
    watcher = make_client("watcher")
    assert channel_count(watcher) == 0
    h = host()
    _, s = h("open")
    assert h(f"login {s} {PIN}")[0] == "CKR_OK"  # over the bus: it carries the PIN
    before = watcher.statistics()
    rv, sig = h(f"sign {s} 1 ECDSA {digest(MSG).hex()}")
    assert rv == "CKR_OK"
    verify(tokens.cert("ec"), "ECDSA", MSG, bytes.fromhex(sig))
    assert channel_count(watcher) == 1
    after = watcher.statistics()
    # Finding the key went over the channel (the signature over the fast path); channel
    # replies count in CallsServed too.
    assert int(after["ChannelCalls"]) > int(before["ChannelCalls"])
    assert int(after["CallsServed"]) - int(before["CallsServed"]) >= \
        int(after["ChannelCalls"]) - int(before["ChannelCalls"])
    h.close()
    wait_until(lambda: channel_count(watcher) == 0, what="the channel closed with its process")


def test_without_channels_the_proxy_uses_the_bus(start_daemon, host, make_client, tokens):
    d = start_daemon(caching=True, args=["--channel", "none"])
    assert "peer channels off" in d.stderr_text()
    h = host()
    _, s = h("open")
    assert h(f"login {s} {PIN}")[0] == "CKR_OK"
    rv, sig = h(f"sign {s} 1 ECDSA {digest(MSG).hex()}")
    assert rv == "CKR_OK"
    verify(tokens.cert("ec"), "ECDSA", MSG, bytes.fromhex(sig))
    c = make_client()
    assert channel_count(c) == 0
    assert int(c.statistics()["ChannelCalls"]) == 0
    assert c.error(c.call, MANAGER_PATH, CMANAGER, "OpenChannel") == "org.freedesktop.DBus.Error.NotSupported"


def test_a_ticket_binds_only_its_own_process_and_only_once(start_daemon, make_client, tmp_path):
    start_daemon(caching=True)
    c = make_client()
    address, ticket = open_channel(c)
    # Another process (another pid, same uid) with the ticket: refused, ticket used up.
    script = textwrap.dedent(f"""
        import dbus, dbus.connection, sys
        conn = dbus.connection.Connection({address!r})
        try:
            conn.call_blocking(None, {MANAGER_PATH!r}, {CHANNEL!r}, "Bind", "ay",
                               (dbus.ByteArray({ticket!r}),), timeout=10)
        except dbus.exceptions.DBusException as e:
            print(e.get_dbus_name()); sys.exit(0)
        print("bound"); sys.exit(1)
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == ACCESS_DENIED, out.stdout + out.stderr
    with pytest.raises(CallError) as e:
        bind(peer(address), ticket)
    assert e.value.name == ACCESS_DENIED
    # A made-up ticket, and a wrong-sized one.
    for bogus in (bytes(32), b"x"):
        with pytest.raises(CallError) as e:
            bind(peer(address), bogus)
        assert e.value.name == ACCESS_DENIED
    # A fresh ticket, redeemed from the process that asked for it: bound.
    _, ticket = open_channel(c)
    conn = peer(address)
    bind(conn, ticket)
    assert [str(p) for p, _ in peer_call(conn, MANAGER_PATH, CMANAGER, "GetSlots")] == \
        [str(p) for p, _ in c.call(MANAGER_PATH, CMANAGER, "GetSlots")]


def test_unbound_channel_answers_nothing_and_is_closed(start_daemon, make_client):
    start_daemon(caching=True)
    c = make_client()
    address, _ = open_channel(c)
    conn = peer(address)
    with pytest.raises(CallError) as e:
        peer_call(conn, MANAGER_PATH, CMANAGER, "GetSlots")
    assert e.value.name == ACCESS_DENIED
    assert channel_count(c) == 1
    # Not bound within 5 s: closed.
    wait_until(lambda: channel_count(c) == 0, timeout=15, what="the unbound channel closed")


def test_channel_speaks_for_its_caller_and_refuses_pins(start_daemon, make_client, tokens):
    start_daemon(caching=True)
    a, b = make_client("A"), make_client("B")
    address, ticket = open_channel(a)
    conn = peer(address)
    bind(conn, ticket)
    session = str(peer_call(conn, slot_of(a), CSLOT, "OpenSession", "t", (dbus.UInt64(CKF_SERIAL_SESSION),)))
    # The session opened on the channel is A's on the bus too, and nobody else's.
    assert a.call(session, CSESSION, "GetSessionInfo")[0] == peer_call(conn, session, CSESSION, "GetSessionInfo")[0]
    assert b.error(b.call, session, CSESSION, "GetSessionInfo") is not None
    # A PIN never travels on a channel: the daemon could not scrub its receive buffer.
    with pytest.raises(CallError) as e:
        peer_call(conn, session, CSESSION, "Login", "ts", (dbus.UInt64(1), PIN))
    assert e.value.name == ACCESS_DENIED and "over the bus" in e.value.message
    # Logged in over the bus, the channel signs in the same environment.
    a.call(session, CSESSION, "Login", dbus.UInt64(1), PIN)
    found = peer_call(conn, session, CSESSION, "FindObjects", "a(tay)t",
                      (dbus.Array([(dbus.UInt64(0), dbus.ByteArray((3).to_bytes(8, "little"))),  # CKO_PRIVATE_KEY
                                   (dbus.UInt64(0x102), dbus.ByteArray(b"\x01"))], signature="(tay)"),
                       dbus.UInt64(10)))
    keys = [k for k in found]
    assert len(keys) == 1, "the private key is visible through the channel after the bus login"
    mech = dbus.Struct((dbus.UInt64(0x1041), dbus.ByteArray(b"")), signature="tay")  # CKM_ECDSA
    sig = bytes(peer_call(conn, session, CSESSION, "Sign", "(tay)tay",
                          (mech, dbus.UInt64(keys[-1]), dbus.ByteArray(digest(MSG)))))
    verify(tokens.cert("ec"), "ECDSA", MSG, sig)


def test_channel_closes_when_its_caller_leaves_the_bus(start_daemon, make_client):
    start_daemon(caching=True)
    a, watcher = make_client("A"), make_client("watcher")
    address, ticket = open_channel(a)
    conn = peer(address)
    bind(conn, ticket)
    assert channel_count(watcher) == 1
    a.close()
    wait_until(lambda: channel_count(watcher) == 0, what="the channel closed after its caller left")
    with pytest.raises(CallError):
        peer_call(conn, MANAGER_PATH, CMANAGER, "GetSlots")


# --- the fast path (dbus/README.md, "Fast path") -------------------------------------

FP_REQUEST = 0x31464350
FP_REPLY = 0x31524350
OP_SIGN = 1
CKM_ECDSA = 0x1041


def open_fast_path(client):
    fd = client.conn.get_object(BUS_NAME, MANAGER_PATH, introspect=False).OpenFastPath(
        dbus_interface=CMANAGER, timeout=10)
    s = socket.socket(fileno=fd.take())
    assert s.type == socket.SOCK_SEQPACKET
    s.settimeout(10)
    return s


def fp_request(op, session, mechanism, key, data, parameter=b"", signature=b""):
    return struct.pack("<IIQQQIII", FP_REQUEST, op, session, mechanism, key, len(parameter), len(data),
                       len(signature)) + parameter + data + signature


def fp_exchange(s, frame):
    s.send(frame)
    reply = s.recv(1 << 17)
    magic, status, first, second = struct.unpack_from("<IIII", reply)
    assert magic == FP_REPLY and len(reply) == 16 + first + second, reply
    body = reply[16:]
    if status == 0:
        return ("output", body)
    return ("error", body[:first].decode(), body[first:].decode())


def session_number(path):
    return int(str(path).rsplit("/", 1)[1])


def test_proxy_signs_over_the_fast_path(start_daemon, host, make_client, tokens):
    start_daemon(caching=True)
    watcher = make_client("watcher")
    h = host()
    _, s = h("open")
    assert h(f"login {s} {PIN}")[0] == "CKR_OK"
    before = watcher.statistics()
    for _ in range(3):
        rv, sig = h(f"sign {s} 1 ECDSA {digest(MSG).hex()}")
        assert rv == "CKR_OK"
        verify(tokens.cert("ec"), "ECDSA", MSG, bytes.fromhex(sig))
    after = watcher.statistics()
    assert int(after["FastPaths"]) == 1
    assert int(after["FastPathCalls"]) - int(before["FastPathCalls"]) >= 3
    # A wrong key handle gives the same code as over D-Bus (the conformance test compares
    # every code with SoftHSM's own).
    assert h(f"signh {s} 999999 ECDSA {digest(MSG).hex()}")[0] == "CKR_KEY_HANDLE_INVALID"
    h.close()
    wait_until(lambda: int(watcher.statistics()["FastPaths"]) == 0, what="the fast path closed with its process")


def test_fast_path_serves_only_its_callers_sessions_and_drops_bad_frames(start_daemon, make_client, tokens):
    start_daemon(caching=True)
    a, b = make_client("A"), make_client("B")
    sa = a.call(slot_of(a), CSLOT, "OpenSession", dbus.UInt64(CKF_SERIAL_SESSION))
    a.call(sa, CSESSION, "Login", dbus.UInt64(1), PIN)
    found = a.call(sa, CSESSION, "FindObjects",
                   dbus.Array([(dbus.UInt64(0), dbus.ByteArray((3).to_bytes(8, "little"))),
                               (dbus.UInt64(0x102), dbus.ByteArray(b"\x01"))], signature="(tay)"), dbus.UInt64(10))
    assert len(found) == 1
    key = int(found[0])
    fa, fb = open_fast_path(a), open_fast_path(b)
    kind, sig = fp_exchange(fa, fp_request(OP_SIGN, session_number(sa), CKM_ECDSA, key, digest(MSG)))
    assert kind == "output"
    verify(tokens.cert("ec"), "ECDSA", MSG, sig)
    # B's fast path cannot reach A's session: what the bus says for another's session.
    assert fp_exchange(fb, fp_request(OP_SIGN, session_number(sa), CKM_ECDSA, key, digest(MSG)))[:2] == \
        ("error", ACCESS_DENIED)
    # Errors are the D-Bus path's, name and message.
    kind, name, message = fp_exchange(fa, fp_request(OP_SIGN, session_number(sa), 0xFFFF, key, digest(MSG)))
    assert kind == "error" and name == "org.pincache.Error.MechanismInvalid" and "(0x70)" in message
    # A malformed frame (a length that does not add up) ends that fast path, nothing else.
    fb.send(fp_request(OP_SIGN, 1, CKM_ECDSA, key, digest(MSG))[:-1])
    assert fb.recv(100) == b""
    kind, _ = fp_exchange(fa, fp_request(OP_SIGN, session_number(sa), CKM_ECDSA, key, digest(MSG)))
    assert kind == "output"
    # So does an oversized one.
    fb = open_fast_path(b)
    fb.send(fp_request(OP_SIGN, 1, CKM_ECDSA, key, bytes(70000)))
    assert fb.recv(100) == b""
    # Leaving the bus closes the caller's fast path.
    a.close()
    assert fa.recv(100) == b""
    assert int(b.statistics()["FastPaths"]) == 0
