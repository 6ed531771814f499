#!/usr/bin/python3
"""Writes the seed corpora in Fuzz/corpus/<target>/ (run from anywhere; rerun after editing).

Seeds are valid inputs of every shape the decoders expect, plus the hostile shapes issue 6
names: nesting depth 10^4, length/count mismatches, count x size overflows and NULL
parameters. D-Bus messages are marshalled here by hand (little-endian, version 1) so that
malformed ones can be written byte by byte; libdbus decides which of them it accepts.
"""
import os
import struct
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")

# --- D-Bus marshalling ------------------------------------------------------------------

ALIGN = {"y": 1, "b": 4, "n": 2, "q": 2, "i": 4, "u": 4, "x": 8, "t": 8, "d": 8, "h": 4,
         "s": 4, "o": 4, "g": 1, "a": 4, "(": 8, "{": 8, "v": 1}
FIXED = {"y": "<B", "b": "<I", "n": "<h", "q": "<H", "i": "<i", "u": "<I", "x": "<q", "t": "<Q",
         "d": "<d", "h": "<I"}


def split_types(sig):
    """Complete types of a signature."""
    out, i = [], 0
    while i < len(sig):
        j = complete_end(sig, i)
        out.append(sig[i:j])
        i = j
    return out


def complete_end(sig, i):
    c = sig[i]
    if c == "a":
        return complete_end(sig, i + 1)
    if c in "({":
        close = ")" if c == "(" else "}"
        depth, j = 0, i
        while True:
            if sig[j] in "({":
                depth += 1
            elif sig[j] in ")}":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
    return i + 1


class Writer:
    def __init__(self, start=0):
        self.buf = bytearray()
        self.start = start  # offset of buf[0] in the message, for alignment

    def align(self, n):
        while (self.start + len(self.buf)) % n:
            self.buf.append(0)

    def write(self, sig, value):
        c = sig[0]
        self.align(ALIGN[c])
        if c in FIXED:
            self.buf += struct.pack(FIXED[c], value)
        elif c in "so":
            data = value.encode() if isinstance(value, str) else value
            self.buf += struct.pack("<I", len(data)) + data + b"\0"
        elif c == "g":
            data = value.encode()
            self.buf += bytes([len(data)]) + data + b"\0"
        elif c == "v":
            inner_sig, inner = value
            self.write("g", inner_sig)
            self.write(inner_sig, inner)
        elif c == "(":
            for t, v in zip(split_types(sig[1:-1]), value):
                self.write(t, v)
        elif c == "a":
            element = sig[1:]
            at = len(self.buf)
            self.buf += b"\0\0\0\0"
            self.align(ALIGN[element[0]])
            first = len(self.buf)
            if element[0] == "{":
                key, val = split_types(element[1:-1])
                for k, v in value:
                    self.align(8)
                    self.write(key, k)
                    self.write(val, v)
            elif element == "y" and isinstance(value, (bytes, bytearray)):
                self.buf += value
            else:
                for v in value:
                    self.write(element, v)
            struct.pack_into("<I", self.buf, at, len(self.buf) - first)
        else:
            raise ValueError(sig)


def body(sig, values):
    w = Writer()
    for t, v in zip(split_types(sig), values):
        w.write(t, v)
    return bytes(w.buf)


def message(sig, payload, kind=1, path="/org/pincache/session/1", interface="org.pincache.CryptokiSession1",
            member="Sign", reply_serial=None, unix_fds=None, body_length=None, extra_fields=()):
    """A whole message; `payload` is body bytes (see body())."""
    fields = []
    if kind in (1, 4):
        fields += [(1, ("o", path)), (3, ("s", member))]
        if interface:
            fields.append((2, ("s", interface)))
    if kind in (2, 3):
        fields.append((5, ("u", reply_serial or 1)))
    if kind == 3:
        fields.append((4, ("s", "org.pincache.Error.Failed")))
    if sig:
        fields.append((8, ("g", sig)))
    if unix_fds is not None:
        fields.append((9, ("u", unix_fds)))
    fields += list(extra_fields)
    w = Writer()
    w.buf += b"l" + bytes([kind, 0, 1])
    w.buf += struct.pack("<II", len(payload) if body_length is None else body_length, 7)
    w.write("a(yv)", fields)
    w.align(8)
    return bytes(w.buf) + payload


def call(sig, values, **kw):
    return message(sig, body(sig, values), **kw)


def reply(sig, values, **kw):
    return message(sig, body(sig, values), kind=2, **kw)


ulong = lambda *v: b"".join(struct.pack("<Q", x) for x in v)
CKM_RSA_PKCS_OAEP, CKM_SHA256_RSA_PKCS_PSS, CKM_AES_CBC = 0x9, 0x43, 0x1082

# --- the seeds --------------------------------------------------------------------------

def deep_variant(depth):
    """Body of signature 'v': `depth` variants, each holding the next, an int inside."""
    out = bytearray()
    for _ in range(depth):
        out += b"\x01v\x00"
    out += b"\x01i\x00"
    while len(out) % 4:
        out.append(0)
    return bytes(out) + struct.pack("<i", 7)


def deep_array(depth):
    """'a'*depth + 'y' with one element per level, beyond D-Bus's 32-array limit when depth > 32."""
    sig = "a" * depth + "y"
    inner = bytes([1])
    for level in range(depth):
        inner = struct.pack("<I", len(inner)) + inner  # arrays of arrays align to 4; sizes kept simple
    return sig, inner


def message_seeds():
    template = [(0x0, ulong(3)), (0x3, b"label"), (0x102, b"\x01\x02")]
    pss = (CKM_SHA256_RSA_PKCS_PSS, ulong(0x250, 2, 32))
    oaep = (CKM_RSA_PKCS_OAEP, ulong(0x250, 2, 1))
    seeds = {
        "sign-pss": call("(tay)tay", [pss, 2, b"hello"]),
        "sign-oaep-label": call("(tay)tay", [(CKM_RSA_PKCS_OAEP, ulong(0x250, 2, 1) + b"label"), 2, b"x"], member="Decrypt"),
        "sign-aes-iv": call("(tay)tay", [(CKM_AES_CBC, bytes(16)), 2, b"0123456789abcdef"], member="Encrypt"),
        "find-objects": call("a(tay)t", [template, 10], member="FindObjects"),
        "get-attributes": call("tat", [5, [0, 1, 2, 0x11, 0x40000211]], member="GetAttributes"),
        "set-attributes": call("ta(tay)", [5, template], member="SetAttributes"),
        "generate-key-pair": call("(tay)a(tay)a(tay)", [(0x1040, b""), template, template], member="GenerateKeyPair"),
        "login": call("ts", [1, "123456"], member="Login"),
        "set-pin": call("ss", ["123456", "654321"], member="SetPIN"),
        "init-token": call("ss", ["so-pin", "label"], path="/org/pincache/token/1",
                           interface="org.pincache.CryptokiSlot1", member="InitToken"),
        "session-sign": call("aysay", [b"\x01", "ECDSA-SHA256", b"data"], interface="org.pincache.Session1"),
        "sign-with-pin": call("saysay", ["1234", b"\x01", "RSA-PSS-SHA256", b"data"], member="SignWithPin",
                              interface="org.pincache.Session1"),
        "token-sign-once": call("saysay", ["1234", b"\x01", "RSA-OAEP-SHA256", b"d"], member="SignOnce",
                                interface="org.pincache.Token1", path="/org/pincache/token/1"),
        "properties-set": call("ssv", ["org.pincache.Manager1", "CachingMode", ("b", 1)], member="Set",
                               interface="org.freedesktop.DBus.Properties", path="/org/pincache"),
        "vardict": call("a{sv}", [[("Label", ("s", "x")), ("TokenFlags", ("t", 1)), ("V", ("(yy)", (2, 40)))]],
                        member="Any"),
        "every-basic": call("ybnqiuxtdsog", [1, 1, -2, 3, -4, 5, -6, 7, 0.5, "s", "/o", "a{sv}"], member="Any"),
        "struct-in-array-in-variant": call("v", [("a(say)", [("a", b"b"), ("c", b"")])], member="Any"),
        "unix-fd-declared": call("h", [0], member="Any", unix_fds=1),
        "unix-fd-undeclared": call("h", [0], member="Any"),
        "no-interface": call("ay", [b"x"], member="Sign", interface=None),
        "signal": call("o", ["/org/pincache/token/1"], kind=4, interface="org.pincache.Manager1", member="TokenInserted"),
        "error-reply": message("s", body("s", ["no such key"]), kind=3),
        # NULL parameters: empty where something is needed.
        "null-mechanism-param-oaep": call("(tay)tay", [(CKM_RSA_PKCS_OAEP, b""), 2, b""], member="Decrypt"),
        "null-template": call("a(tay)t", [[], 0], member="FindObjects"),
        "null-attribute-values": call("a(tay)", [[(0x0, b""), (0x11, b"")]], member="CreateObject"),
        "empty-pin": call("ts", [1, ""], member="Login"),
        "oaep-short-param": call("(tay)tay", [(CKM_RSA_PKCS_OAEP, ulong(0x250)), 2, b"x"], member="Decrypt"),
        "oaep-source-zero": call("(tay)tay", [(CKM_RSA_PKCS_OAEP, ulong(0x250, 2, 0)), 2, b"x"], member="Decrypt"),
        "pss-wrong-size": call("(tay)tay", [(CKM_SHA256_RSA_PKCS_PSS, ulong(0x250, 2)), 2, b"x"]),
        "gcm-pointer-param": call("(tay)tay", [(0x1087, ulong(0xdeadbeef, 12, 0, 0, 128)), 2, b"x"], member="Encrypt"),
        # Nesting: 10^4 variants (body 30 kB), and arrays/structs at and beyond D-Bus's limits.
        "deep-variant-10000": message("v", deep_variant(10_000)),
        "deep-variant-64": message("v", deep_variant(64)),
        "deep-variant-31": message("v", deep_variant(31)),
        "deep-struct-32": message("(" * 32 + "y" + ")" * 32, bytes([1])),
        "deep-struct-33": message("(" * 33 + "y" + ")" * 33, bytes([1])),
    }
    for depth in (32, 33):
        sig, data = deep_array(depth)
        seeds[f"deep-array-{depth}"] = message(sig, data)
    # Length and count mismatches: the declared length of a string, an array or the whole
    # body against what is there.
    sign = body("(tay)tay", [pss, 2, b"hello"])
    seeds["array-longer-than-body"] = message("(tay)tay", sign[:8] + struct.pack("<I", 0xFFFF) + sign[12:])
    seeds["body-length-short"] = message("(tay)tay", sign, body_length=len(sign) - 3)
    seeds["body-length-long"] = message("(tay)tay", sign, body_length=len(sign) + 64)
    seeds["string-longer-than-body"] = message("ts", ulong(1) + struct.pack("<I", 1 << 30) + b"1234\0")
    seeds["string-no-nul"] = message("ts", ulong(1) + struct.pack("<I", 4) + b"1234x")
    seeds["signature-says-more"] = message("(tay)tayay", sign)
    seeds["signature-says-less"] = message("(tay)", sign)
    seeds["at-odd-length"] = message("tat", ulong(5) + struct.pack("<I", 7) + ulong(1))
    # count x size overflows: array byte lengths that overflow when multiplied or aligned.
    seeds["at-count-overflow"] = message("tat", ulong(5) + struct.pack("<I", 0xFFFFFFF8) + ulong(1))
    seeds["template-count-overflow"] = message("a(tay)", struct.pack("<I", 0x7FFFFFFF) + bytes(4) + ulong(0) + struct.pack("<I", 0xFFFFFFFF))
    seeds["ay-length-max"] = message("ay", struct.pack("<I", 0xFFFFFFFF) + b"x")
    # Too many template entries (257) and an attribute above 1 MiB, both well formed.
    seeds["template-257"] = call("a(tay)", [[(i, b"") for i in range(257)]], member="CreateObject")
    seeds["attribute-1MiB+1"] = call("a(tay)", [[(0x11, bytes((1 << 20) + 1))]], member="CreateObject")
    return seeds


def nested_variant(depth, inner):
    for _ in range(depth):
        inner = ("v", inner)
    return inner


def reply_seeds():
    token = [("SlotDescription", ("s", "slot")), ("SlotManufacturer", ("s", "m")), ("SlotFlags", ("t", 7)),
             ("HardwareVersion", ("(yy)", (1, 2))), ("FirmwareVersion", ("(yy)", (3, 4))), ("TokenPresent", ("b", 1)),
             ("Label", ("s", "token label that is longer than thirty-two bytes")), ("Manufacturer", ("s", "é" * 40)),
             ("Model", ("s", "m")), ("Serial", ("s", "1")), ("TokenFlags", ("t", 0x40D)),
             ("MaxSessionCount", ("t", 0)), ("MaxRwSessionCount", ("t", 0)), ("MaxPinLen", ("t", 255)),
             ("MinPinLen", ("t", 4)), ("TotalPublicMemory", ("t", 2**64 - 1)), ("FreePublicMemory", ("t", 0)),
             ("TotalPrivateMemory", ("t", 0)), ("FreePrivateMemory", ("t", 0)),
             ("TokenHardwareVersion", ("(yy)", (0, 0))), ("TokenFirmwareVersion", ("(yy)", (0, 0))),
             ("UtcTime", ("s", "2024010112000000"))]
    wrong_types = [("TokenPresent", ("s", "yes")), ("Label", ("t", 5)), ("HardwareVersion", ("(yyy)", (1, 2, 3))),
                   ("MaxPinLen", ("i", -1)), ("FirmwareVersion", ("v", ("(yy)", (1, 1))))]
    attrs = [(0x0, 0, ulong(3)), (0x3, 0, b"label"), (0x11, 0x11, b""), (0x40000211, 0, ulong(0xdeadbeef)),
             (0x12, 0x12, b""), (0x100, 0x5, b"")]
    seeds = {
        "get-slots": reply("a(oa{sv})", [[("/org/pincache/token/1", token), ("/org/pincache/token/2", [("TokenPresent", ("b", 0))])]]),
        "get-slots-wrong-types": reply("a(oa{sv})", [[("/org/pincache/token/1", wrong_types)]]),
        "get-slots-empty": reply("a(oa{sv})", [[]]),
        "get-slots-same-path-twice": reply("a(oa{sv})", [[("/org/pincache/token/1", token), ("/org/pincache/token/1", [])]]),
        "get-mechanisms": reply("a(tttt)", [[(1, 1024, 4096, 0x2800), (0x1087, 0, 2**64 - 1, 0)]]),
        "get-attributes": reply("a(ttay)", [attrs]),
        "get-attributes-empty": reply("a(ttay)", [[]]),
        "get-session-info": reply("(ttt)", [(0, 3, 6)]),
        "find-objects": reply("at", [[1, 2, 3]]),
        "open-session": reply("o", ["/org/pincache/session/1"]),
        "generate-key-pair": reply("tt", [1, 2]),
        "sign": reply("ay", [bytes(256)]),
        "empty": message("", b"", kind=2),
        "error": message("s", body("s", ["org.pincache.Error"]), kind=3),
        "unix-fd": message("h", struct.pack("<I", 0), kind=2, unix_fds=1),
        "deep-variant-10000": message("v", deep_variant(10_000), kind=2),
        "deep-vardict": reply("a(oa{sv})", [[("/t", [("TokenPresent", nested_variant(8, ("b", 1)))])]]),
        "too-many-slots": reply("a(oa{sv})", [[("/t%d" % i, []) for i in range(2000)]]),
        "attributes-count-mismatch": message("a(ttay)", body("a(ttay)", [attrs])[:20] + bytes(4), kind=2),
        "attributes-count-overflow": message("a(ttay)", struct.pack("<I", 0xFFFFFFF0) + bytes(4) + ulong(0, 0) + struct.pack("<I", 0xFFFFFFFF), kind=2),
        "sign-length-overflow": message("ay", struct.pack("<I", 0xFFFFFFFF), kind=2),
    }
    return seeds


def configuration_seeds():
    return {
        "sample": b"""# pincache sample
  P11_EnableCachePIN = 0
P11_LogoutAfterSign=1   # force logout
ForceLoginBeforeSignKeyUsage=0x40
PinCacheTimeout=300
Module=/usr/lib/softhsm/libsofthsm2.so
MaxSessionsPerClient=8
SlotPollInterval=250\r

[app /usr/bin/evolution]
P11_EnableCachePIN=0
[ app   /opt/My App/bin/signer ]
ForceLoginBeforeSignKeyUsage=64
""",
        "bom-crlf": b"\xef\xbb\xbfP11_EnableCachePIN=1\r\nPinCacheTimeout=0\r\n",
        "overflow-numbers": b"PinCacheTimeout=99999999999999999999999999\nMaxSessionsPerClient=0x100000000\nSlotPollInterval=-1\n",
        "hex-overflow": b"ForceLoginBeforeSignKeyUsage=0xFFFFFFFFFFFFFFFFFF\n",
        "nested-sections-10000": b"[app " * 10_000 + b"]" * 10_000 + b"\n",
        "long-line": b"Module=/" + b"a" * 100_000 + b"\n",
        "nul-bytes": b"P11_EnableCachePIN=\x001\n[app /x\x00]\n",
        "invalid-utf8": b"Module=/usr/lib/\xff\xfe.so\n",
        "empty-key": b"=1\n[app]\n[app ]\n[]\n",
        "many-sections": b"".join(b"[app /bin/%d]\nPinCacheTimeout=%d\n" % (i, i) for i in range(2000)),
        "module-in-section": b"[app /bin/x]\nModule=/lib/x.so\n",
    }


def der(tag, content):
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def certificate(key_usage=None, extensions=None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import datetime
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz")])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(1).not_valid_before(datetime.datetime(2024, 1, 1))
               .not_valid_after(datetime.datetime(2034, 1, 1)))
    if key_usage is not None:
        builder = builder.add_extension(x509.KeyUsage(**key_usage), critical=True)
    builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def key_usage_seeds():
    base = dict(digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False)
    seeds = {
        "no-key-usage": certificate(),
        "non-repudiation": certificate(dict(base, content_commitment=True)),
        "digital-signature": certificate(dict(base, digital_signature=True)),
        "decipher-only": certificate(dict(base, key_agreement=True, decipher_only=True)),
    }
    valid = seeds["non-repudiation"]
    seeds["truncated"] = valid[: len(valid) // 2]
    seeds["nested-sequence-10000"] = b"".join(b"\x30\x84" + struct.pack(">I", 6 * (10_000 - i - 1)) for i in range(10_000))
    seeds["length-overflow"] = b"\x30\x88" + b"\xff" * 8 + valid[4:]
    seeds["length-beyond-input"] = b"\x30\x84\x7f\xff\xff\xff" + valid[4:]
    seeds["indefinite-length"] = b"\x30\x80" + valid[4:] + b"\x00\x00"
    seeds["long-form-for-short"] = b"\x30\x81\x05" + bytes(5)
    seeds["two-key-usages"] = der(0x30, der(0x30, der(0x02, b"\x01") + der(0x30, b"") * 5 + der(0xA3, der(0x30,
        der(0x30, der(0x06, b"\x55\x1d\x0f") + der(0x04, der(0x03, b"\x07\x80"))) * 2))) + der(0x30, b"") + der(0x03, b"\x00"))
    seeds["bitstring-empty"] = der(0x30, der(0x30, der(0x02, b"\x01") + der(0x30, b"") * 5 + der(0xA3, der(0x30,
        der(0x30, der(0x06, b"\x55\x1d\x0f") + der(0x04, der(0x03, b""))))) ) + der(0x30, b"") + der(0x03, b"\x00"))
    seeds["bitstring-unused-8"] = seeds["bitstring-empty"].replace(der(0x03, b""), der(0x03, b"\x08\xff"))
    return seeds


# proxy-arguments: see Fuzz/README.md for the layout this mirrors.
def small(n):
    return bytes([0, n])              # length(): selector 0, one byte


def medium(n):
    return bytes([1]) + struct.pack("<H", n)


def huge(n):
    return bytes([2]) + struct.pack("<Q", n)


def buf(length_bytes, content=b"", null=False):
    return length_bytes + bytes([0 if null else 1]) + content


def attr(type_, length_bytes, content=b"", null=False):
    return struct.pack("<Q", type_) + buf(length_bytes, content, null)


def template_input(entries, count=None, null=False):
    return (count if count is not None else small(len(entries))) + bytes([0 if null else 1]) + b"".join(entries)


def proxy_argument_seeds():
    CKA_WRAP_TEMPLATE = 0x40000211
    nested = bytearray()
    for _ in range(10_000):     # each level: one array attribute pointing at the next
        nested += small(1) + bytes([1]) + struct.pack("<Q", CKA_WRAP_TEMPLATE) + bytes([0])
    nested += template_input([attr(0x3, small(4), b"leaf")])
    return {
        "template": b"\x00" + template_input([attr(0x0, small(8), bytes(8)), attr(0x3, small(5), b"label")]),
        "template-null-values": b"\x00" + template_input([attr(0x0, small(8), null=True), attr(0x3, small(0), null=True)]),
        "template-null-pointer-count-3": b"\x00" + template_input([], count=small(3), null=True),
        "template-count-max": b"\x00" + template_input([attr(0x0, small(1), b"x")], count=huge(2**64 - 1)),
        "template-count-times-size-overflows": b"\x00" + template_input([attr(0x0, small(1), b"x")], count=huge(2**59 + 1)),
        "template-257": b"\x00" + template_input([attr(i, small(0)) for i in range(257)], count=medium(257)),
        "attribute-length-max": b"\x00" + template_input([attr(0x11, huge(2**64 - 1), b"short")]),
        "attribute-1MiB+1": b"\x00" + template_input([attr(0x11, huge((1 << 20) + 1), b"short")]),
        "nested-template-10000": b"\x00" + bytes(nested),
        "types": b"\x01" + template_input([attr(0x0, small(0)), attr(0x11, small(0))]),
        "types-null-count-1": b"\x01" + template_input([], count=small(1), null=True),
        "mechanism-null": b"\x02\x0f",
        "mechanism-oaep-struct": b"\x02\x00\x00" + struct.pack("<QQQ", 0x250, 2, 1) + buf(small(5), b"label"),
        "mechanism-oaep-null-label-len-5": b"\x02\x00\x00" + struct.pack("<QQQ", 0x250, 2, 1) + buf(small(5), null=True),
        "mechanism-oaep-label-len-max": b"\x02\x00\x00" + struct.pack("<QQQ", 0x250, 2, 1) + buf(huge(2**64 - 1), b"x"),
        "mechanism-oaep-raw-short": b"\x02\x00\x01" + buf(small(8), bytes(8)),
        "mechanism-pss": b"\x02\x01" + buf(small(24), struct.pack("<QQQ", 0x250, 2, 32)),
        "mechanism-gcm": b"\x02\x02" + buf(small(40), bytes(40)),
        "mechanism-null-param-len-24": b"\x02\x01" + buf(small(24), null=True),
        "mechanism-param-len-max": b"\x02\x04" + buf(huge(2**64 - 1), b"iv"),
        "mechanism-any-type": b"\x02\x05" + struct.pack("<Q", 0x80000001) + buf(small(3), b"abc"),
        "bytes": b"\x03" + buf(small(5), b"hello"),
        "bytes-null-len-5": b"\x03" + buf(small(5), null=True),
        "bytes-len-max": b"\x03" + buf(huge(2**64 - 1), b"x"),
        "bytes-len-16MiB+1": b"\x03" + buf(huge((16 << 20) + 1), b"x"),
        "pin": b"\x04" + buf(small(6), b"123456"),
        "pin-null-len-6": b"\x04" + buf(small(6), null=True),
        "pin-nul-inside": b"\x04" + buf(small(4), b"12\x004"),
        "pin-invalid-utf8": b"\x04" + buf(small(4), b"\xff\xfe12"),
        "pin-257": b"\x04" + buf(medium(257), b"1" * 257),
    }


def fast_path_seeds():
    """The first byte picks the decoder: even = request (daemon side), odd = reply (proxy side)."""
    def req(op=1, session=1, mech=0x1041, key=1, param=b"", data=b"\x00" * 32, sig=b"", counts=None):
        p, d, s = counts or (len(param), len(data), len(sig))
        return b"\x00" + struct.pack("<IIQQQIII", 0x31464350, op, session, mech, key, p, d, s) + param + data + sig

    def rep(status, first, second, body, counts=None):
        a, b = counts or (first, second)
        return b"\x01" + struct.pack("<IIII", 0x31524350, status, a, b) + body

    return {
        "request-sign": req(),
        "request-verify": req(op=3, sig=b"\x01" * 64),
        "request-oaep-params": req(op=2, mech=9, param=bytes(24)),
        "request-sign-with-signature": req(sig=b"x"),
        "request-unknown-op": req(op=9),
        "request-count-overflow": req(counts=(0, 0xFFFFFFFF, 0xFFFFFFFF)),
        "request-count-short": req(counts=(0, 33, 0)),
        "request-param-too-long": req(param=bytes(1025)),
        "request-data-max": req(data=bytes(64 * 1024)),
        "request-data-max-plus-1": req(data=bytes(64 * 1024 + 1)),
        "request-empty": b"\x00",
        "reply-output": rep(0, 64, 0, bytes(64)),
        "reply-error": rep(1, 9, 2, b"org.x.Bad" + b"ok"),
        "reply-error-bad-name": rep(1, 5, 0, b"a/b.c"),
        "reply-error-bad-utf8": rep(1, 3, 2, b"a.B\xff\xfe"),
        "reply-output-with-second": rep(0, 1, 1, b"ab"),
        "reply-count-overflow": rep(0, 0xFFFFFFFF, 0xFFFFFFFF, b""),
        "reply-status-2": rep(2, 0, 0, b""),
    }


def write(target, seeds):
    directory = os.path.join(ROOT, target)
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.startswith("seed-"):
            os.remove(os.path.join(directory, name))
    for name, data in seeds.items():
        with open(os.path.join(directory, "seed-" + name), "wb") as f:
            f.write(data)


def main():
    messages = message_seeds()
    replies = reply_seeds()
    write("dbus-message", {**messages, **{"reply-" + k: v for k, v in replies.items()}})
    write("service-arguments", messages)
    write("proxy-reply", replies)
    write("configuration", configuration_seeds())
    write("key-usage", key_usage_seeds())
    write("proxy-arguments", proxy_argument_seeds())
    write("fast-path", fast_path_seeds())


if __name__ == "__main__":
    sys.exit(main())
