"""A client of the proxy's wire (dbus/README.md, "The Cryptoki wire"), for tests: the socket
from Manager1.OpenCryptoki, and one encoder and decoder driven by dbus/cryptoki-wire.json, the
table pincached declares (`pincached --print-wire-table`). Nothing here lists a call's fields:
they come from the table, caps included.

    w = CryptokiSocket(client)            # a pincache_client.Client (its bus connection)
    slots = w.call("GetSlots")[0]         # response fields as a list; records are tuples
    s = w.call("OpenSession", slots[0][0], 0x6)[0]
    w.call("Login", s, 1, b"931270486")   # raises WireError(rv, message) on an error frame
"""

import json
import socket
import struct
from pathlib import Path

import dbus

TABLE = json.loads((Path(__file__).resolve().parents[2] / "dbus" / "cryptoki-wire.json").read_text())
CALLS = {c["name"]: c for c in TABLE["calls"]}
BY_ID = {c["id"]: c for c in TABLE["calls"]}
HEADER = struct.Struct("<IIHBB")
REQUEST, REPLY, ERROR = 0, 1, 2


class WireError(Exception):
    """An error frame: the CK_RV as a number, and the daemon's words."""

    def __init__(self, rv, message):
        super().__init__(f"CK_RV {rv:#x}: {message}")
        self.rv = rv
        self.message = message


class Closed(Exception):
    """The daemon closed the socket (it refused a frame, or went away)."""


class CapError(ValueError):
    pass


def encode(values, fields, check=True):
    out = bytearray()
    if len(values) != len(fields):
        raise CapError(f"{len(values)} values for {len(fields)} fields")
    for value, field in zip(values, fields):
        _put(out, value, field["type"], field["name"], check)
    return bytes(out)


def _put(out, value, t, name, check):
    kind = t["kind"]
    if kind == "ulong":
        out += struct.pack("<Q", value)
    elif kind in ("bytes", "secret", "string"):
        raw = value.encode() if isinstance(value, str) else bytes(value)
        if check and len(raw) > t["max"]:
            raise CapError(f"{name}: {len(raw)} bytes, at most {t['max']}")
        out += struct.pack("<I", len(raw)) + raw
    elif kind == "array":
        if check and len(value) > t["max"]:
            raise CapError(f"{name}: {len(value)} elements, at most {t['max']}")
        out += struct.pack("<I", len(value))
        for item in value:
            _put(out, item, t["element"], name, check)
    elif kind == "record":
        if len(value) != len(t["fields"]):
            raise CapError(f"{name}: record of {len(value)}")
        for item, f in zip(value, t["fields"]):
            _put(out, item, f["type"], f"{name}.{f['name']}", check)
    else:
        raise CapError(f"{name}: unknown kind {kind}")


def decode(body, fields):
    """The values of `fields` in `body`, which they must use up exactly (caps enforced)."""
    values, offset = [], 0
    for f in fields:
        v, offset = _get(body, offset, f["type"], f["name"])
        values.append(v)
    if offset != len(body):
        raise CapError(f"{len(body) - offset} bytes after the last field")
    return values


def _get(body, offset, t, name):
    kind = t["kind"]
    if kind == "record":
        items = []
        for f in t["fields"]:
            item, offset = _get(body, offset, f["type"], f"{name}.{f['name']}")
            items.append(item)
        return tuple(items), offset
    if kind == "ulong":
        if offset + 8 > len(body):
            raise CapError(f"{name}: frame ends inside a number")
        return struct.unpack_from("<Q", body, offset)[0], offset + 8
    if offset + 4 > len(body):
        raise CapError(f"{name}: frame ends inside a length")
    n = struct.unpack_from("<I", body, offset)[0]
    offset += 4
    if n > t["max"]:
        raise CapError(f"{name}: {n} over the cap of {t['max']}")
    if kind in ("bytes", "secret", "string"):
        if offset + n > len(body):
            raise CapError(f"{name}: runs past the end")
        raw = bytes(body[offset:offset + n])
        return (raw.decode() if kind == "string" else raw), offset + n
    if kind == "array":
        items = []
        for _ in range(n):
            item, offset = _get(body, offset, t["element"], name)
            items.append(item)
        return items, offset
    raise CapError(f"{name}: unknown kind {kind}")


def frame(tag, call_id, kind, body):
    return HEADER.pack(len(body), tag, call_id, kind, 0) + body


def request(name, *args, tag=1, check=True):
    c = CALLS[name]
    return frame(tag, c["id"], REQUEST, encode(list(args), c["request"], check))


def reply(name, *values, tag=1, check=True):
    c = CALLS[name]
    return frame(tag, c["id"], REPLY, encode(list(values), c["response"], check))


def error(name, rv, message, tag=1):
    return frame(tag, CALLS[name]["id"], ERROR, encode([rv, message], TABLE["error"]))


def read_frame(sock):
    """(tag, call id, kind, body) of the next frame; raises Closed at the end of the stream."""
    head = _read_exactly(sock, HEADER.size)
    length, tag, call_id, kind, zero = HEADER.unpack(head)
    if length > TABLE["max_body"] or zero != 0:
        raise CapError(f"bad header {length} {kind} {zero}")
    return tag, call_id, kind, _read_exactly(sock, length)


def _read_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise Closed("the socket was closed")
        data += chunk
    return data


def open_socket(client):
    """Manager1.OpenCryptoki on `client`'s bus connection: the socket, not yet greeted."""
    fd = client.conn.call_blocking("org.pincache.Daemon", "/org/pincache", "org.pincache.Manager1",
                                   "OpenCryptoki", "", (), timeout=30)
    return socket.socket(fileno=fd.take())


class CryptokiSocket:
    """One socket, greeted. Calls are synchronous; tags still count up, as the proxy's do."""

    def __init__(self, client=None, sock=None, timeout=30.0):
        self.sock = sock if sock is not None else open_socket(client)
        self.sock.settimeout(timeout)
        self.tag = 0
        self.version, self.daemon = self.call("Hello", TABLE["magic"], TABLE["version"])

    def send_raw(self, data):
        self.sock.sendall(data)

    def call(self, name, *args):
        self.tag += 1
        c = CALLS[name]
        self.sock.sendall(request(name, *args, tag=self.tag))
        tag, call_id, kind, body = read_frame(self.sock)
        assert (tag, call_id) == (self.tag, c["id"]), f"reply {tag}/{call_id} to {self.tag}/{c['id']}"
        if kind == ERROR:
            rv, message = decode(body, TABLE["error"])
            raise WireError(rv, message)
        assert kind == REPLY, kind
        return decode(body, c["response"])

    def is_closed(self, wait=5.0):
        """True once the daemon has closed its end (reads EOF within `wait` seconds)."""
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(1) == b""
        except (socket.timeout, BlockingIOError):
            return False
        except OSError:
            return True

    def close(self):
        self.sock.close()
