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


# --- the Cryptoki wire ------------------------------------------------------------------
# Frames written byte by byte from the documented layout (dbus/README.md, "The Cryptoki
# wire"): a 12-byte header (u32 body length, u32 tag, u16 call id, u8 kind, u8 0), then the
# body. ulong = u64; bytes, secret and string = u32 length + data; array = u32 count +
# elements; record = its fields in order; all little-endian. The field lists come from
# dbus/cryptoki-wire.json (generated from the call table); no cap is checked here, so
# hostile frames are written as easily as good ones.

def _wire_table():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "dbus", "cryptoki-wire.json")
    with open(path) as f:
        return __import__("json").load(f)


WIRE = _wire_table()
CALLS = {c["name"]: c for c in WIRE["calls"]}
REQUEST, REPLY, ERROR = 0, 1, 2


def wire_value(value, t):
    kind = t["kind"]
    if kind == "ulong":
        return struct.pack("<Q", value)
    if kind in ("bytes", "secret", "string"):
        data = value.encode() if isinstance(value, str) else bytes(value)
        return struct.pack("<I", len(data)) + data
    if kind == "array":
        return struct.pack("<I", len(value)) + b"".join(wire_value(v, t["element"]) for v in value)
    if kind == "record":
        assert len(value) == len(t["fields"]), (value, t)
        return b"".join(wire_value(v, f["type"]) for v, f in zip(value, t["fields"]))
    raise ValueError(kind)


def wire_body(fields, values):
    assert len(values) == len(fields), (values, [f["name"] for f in fields])
    return b"".join(wire_value(v, f["type"]) for v, f in zip(values, fields))


def wire_frame(call_id, kind, body, tag=1, length=None, reserved=0):
    return struct.pack("<IIHBB", len(body) if length is None else length, tag, call_id, kind, reserved) + body


def request_body(name, *values):
    return wire_body(CALLS[name]["request"], values)


def reply_body(name, *values):
    return wire_body(CALLS[name]["response"], values)


def error_body(rv, message):
    return wire_body(WIRE["error"], (rv, message))


def wire_request(name, *values, tag=1):
    return wire_frame(CALLS[name]["id"], REQUEST, request_body(name, *values), tag)


def wire_reply(name, *values, tag=1):
    return wire_frame(CALLS[name]["id"], REPLY, reply_body(name, *values), tag)


def wire_error(name, rv, message, tag=1):
    return wire_frame(CALLS[name]["id"], ERROR, error_body(rv, message), tag)


CKM_SHA256_RSA_PKCS = 0x40
PSS_PARAMS = struct.pack("<QQQ", 0x250, 2, 32)           # SHA256, MGF1_SHA256, salt 32
OAEP_PARAMS = struct.pack("<QQQ", 0x250, 2, 1) + b"label"  # ..., CKZ_DATA_SPECIFIED, label
SLOT = ("m0_s1", "slot", "maker", 1, (1, 0), (2, 0), 1, "label", "maker", "model", "0001",
        0x40D, 0, 0, 64, 4, 1, 1, 1, 1, (0, 1), (0, 1), "2024010112000000")
EMPTY_SLOT = ("m1_s0", "reader", "", 0, (0, 0), (0, 0), 0, "", "", "", "", 0, 0, 0, 0, 0, 0, 0, 0, 0, (0, 0), (0, 0), "")
TEMPLATE_2 = [(0x0, struct.pack("<Q", 3)), (0x3, b"label")]
ATTRIBUTE_RESULTS = [(0x0, 0, struct.pack("<Q", 3)), (0x3, 0, b"label"), (0x11, 0x11, b""), (0x12, 0x12, b""),
                     (0x40000211, 0, struct.pack("<Q", 0xdeadbeef)), (0x100, 0x5, b"")]


def wire_request_bodies():
    """(call name, body) of requests, good and broken, for the stream and service-arguments seeds."""
    sign = lambda mechanism, data=b"data": request_body("Sign", 7, mechanism, 2, data)
    good = {
        "hello": ("Hello", request_body("Hello", WIRE["magic"], WIRE["version"])),
        "get-slots": ("GetSlots", b""),
        "get-mechanisms": ("GetMechanisms", request_body("GetMechanisms", "m0_s1")),
        "open-session": ("OpenSession", request_body("OpenSession", "m0_s1", 0x6)),
        "init-token": ("InitToken", request_body("InitToken", "m0_s1", b"so-pin", "label")),
        "login": ("Login", request_body("Login", 7, 1, b"931270486")),
        "login-empty-pin": ("Login", request_body("Login", 7, 1, b"")),
        "set-pin": ("SetPIN", request_body("SetPIN", 7, b"123456", b"654321")),
        "find-objects": ("FindObjects", request_body("FindObjects", 7, TEMPLATE_2, 10)),
        "find-objects-empty-template": ("FindObjects", request_body("FindObjects", 7, [], 2**64 - 1)),
        "get-attributes": ("GetAttributes", request_body("GetAttributes", 7, 5, [0x0, 0x3, 0x11, 0x40000211])),
        "template-2": ("CreateObject", request_body("CreateObject", 7, TEMPLATE_2)),
        "set-attributes-null-values": ("SetAttributes", request_body("SetAttributes", 7, 5, [(0x0, b""), (0x11, b"")])),
        "generate-key-pair": ("GenerateKeyPair", request_body("GenerateKeyPair", 7, (0x1040, b""), TEMPLATE_2, TEMPLATE_2)),
        "sign": ("Sign", sign((CKM_SHA256_RSA_PKCS, b""), bytes(32))),
        "sign-pss": ("Sign", sign((0x43, PSS_PARAMS))),
        "decrypt-oaep-label": ("Decrypt", request_body("Decrypt", 7, (0x9, OAEP_PARAMS), 2, bytes(256))),
        "encrypt-aes-cbc-iv": ("Encrypt", request_body("Encrypt", 7, (0x1082, bytes(16)), 2, bytes(16))),
        "verify": ("Verify", request_body("Verify", 7, (0x43, PSS_PARAMS), 2, b"data", bytes(256))),
        "digest": ("Digest", request_body("Digest", 7, (0x250, b""), b"data")),
        "generate-random": ("GenerateRandom", request_body("GenerateRandom", 7, 32)),
    }
    # Decode fine on the wire, refused by MechanismParameters (the one check).
    refused_parameters = {
        "encrypt-gcm-pointer-param": ("Encrypt", request_body("Encrypt", 7, (0x1087, struct.pack("<QQQQQ", 0xdeadbeef, 12, 0, 0, 128)), 2, b"x")),
        "sign-pss-wrong-size": ("Sign", sign((0x43, PSS_PARAMS[:8]))),
        "decrypt-oaep-short": ("Decrypt", request_body("Decrypt", 7, (0x9, struct.pack("<Q", 0x250)), 2, b"x")),
        "decrypt-oaep-source-zero": ("Decrypt", request_body("Decrypt", 7, (0x9, struct.pack("<QQQ", 0x250, 2, 0)), 2, b"x")),
    }
    at_cap = {
        "decrypt-oaep-label-at-cap": ("Decrypt", request_body("Decrypt", 7, (0x9, OAEP_PARAMS[:24] + bytes(4096 - 24)), 2, b"x")),
        "login-pin-at-cap": ("Login", request_body("Login", 7, 1, b"1" * 256)),
        "template-256": ("CreateObject", request_body("CreateObject", 7, [(i, b"") for i in range(256)])),
    }
    sign_body = sign((0x43, PSS_PARAMS))
    broken = {
        "trailing-byte": ("Sign", sign_body + b"x"),
        "truncated-body": ("Sign", sign_body[:-3]),
        "template-count-over-cap": ("CreateObject", request_body("CreateObject", 7, [(i, b"") for i in range(257)])),
        "template-count-max": ("CreateObject", struct.pack("<Q", 7) + struct.pack("<I", 0xFFFFFFFF) + struct.pack("<Q", 0)),
        "types-count-past-end": ("GetAttributes", struct.pack("<QQI", 7, 5, 200) + struct.pack("<Q", 0)),
        "pin-over-cap": ("Login", request_body("Login", 7, 1, b"1" * 257)),
        "pin-length-max": ("Login", struct.pack("<QQI", 7, 1, 0xFFFFFFFF) + b"1234"),
        "mechanism-param-over-cap": ("Sign", sign((0x43, bytes(4097)))),
        "slot-invalid-utf8": ("GetMechanisms", request_body("GetMechanisms", b"m0\xff\xfe")),
        "slot-nul": ("GetMechanisms", request_body("GetMechanisms", b"m0\x00s1")),
        "label-over-cap": ("InitToken", request_body("InitToken", "m0_s1", b"so-pin", "x" * 33)),
        "hello-empty": ("Hello", b""),
    }
    return {**good, **refused_parameters, **at_cap, **broken}


def wire_reply_bodies():
    """(call name, kind, body) of replies and errors, good and broken."""
    slots = lambda *s: reply_body("GetSlots", list(s))
    good = {
        "hello": ("Hello", REPLY, reply_body("Hello", 1, "pincached 1.0")),
        "get-slots": ("GetSlots", REPLY, slots(SLOT, EMPTY_SLOT)),
        "get-slots-empty": ("GetSlots", REPLY, slots()),
        "get-slots-long-texts": ("GetSlots", REPLY, slots(SLOT[:7] + ("token label longer than thirty-two bytes", "\u00e9" * 40) + SLOT[9:])),
        "get-slots-same-name-twice": ("GetSlots", REPLY, slots(SLOT, SLOT)),
        "get-slots-empty-name": ("GetSlots", REPLY, slots(("",) + SLOT[1:])),
        "get-mechanisms": ("GetMechanisms", REPLY, reply_body("GetMechanisms", [(1, 1024, 4096, 0x2800), (0x1087, 0, 2**64 - 1, 0)])),
        "open-session": ("OpenSession", REPLY, reply_body("OpenSession", 7)),
        "get-session-info": ("GetSessionInfo", REPLY, reply_body("GetSessionInfo", 3, 6, 0)),
        "find-objects": ("FindObjects", REPLY, reply_body("FindObjects", [1, 2, 3])),
        "get-attributes": ("GetAttributes", REPLY, reply_body("GetAttributes", ATTRIBUTE_RESULTS)),
        "get-attributes-empty": ("GetAttributes", REPLY, reply_body("GetAttributes", [])),
        "generate-key-pair": ("GenerateKeyPair", REPLY, reply_body("GenerateKeyPair", 1, 2)),
        "sign": ("Sign", REPLY, reply_body("Sign", bytes(256))),
        "generate-random": ("GenerateRandom", REPLY, reply_body("GenerateRandom", bytes(32))),
        "close-session": ("CloseSession", REPLY, b""),
        "error": ("Sign", ERROR, error_body(0xA0, "CKR_PIN_INCORRECT")),
        "error-ok": ("Login", ERROR, error_body(0, "CKR_OK is no error")),
    }
    broken = {
        "get-slots-over-cap": ("GetSlots", REPLY, slots(*[EMPTY_SLOT] * 1025)),
        "get-slots-count-max": ("GetSlots", REPLY, struct.pack("<I", 0xFFFFFFFF)),
        "get-attributes-trailing": ("GetAttributes", REPLY, reply_body("GetAttributes", ATTRIBUTE_RESULTS[:2]) + bytes(4)),
        "get-attributes-count-past-end": ("GetAttributes", REPLY, struct.pack("<I", 200) + reply_body("GetAttributes", ATTRIBUTE_RESULTS)[4:]),
        "sign-length-max": ("Sign", REPLY, struct.pack("<I", 0xFFFFFFFF)),
        "hello-daemon-name-over-cap": ("Hello", REPLY, reply_body("Hello", 1, "d" * 65)),
        "error-message-invalid-utf8": ("Sign", ERROR, error_body(0x5, b"bad \xc0\x80")),
        "error-message-over-cap": ("Sign", ERROR, error_body(0x5, "m" * 4097)),
    }
    return {**good, **broken}


def wire_stream_seeds():
    """Byte streams for FuzzCryptokiWire: frames as a socket delivers them."""
    seeds = {}
    for name, (call, body) in wire_request_bodies().items():
        seeds["request-" + name] = wire_frame(CALLS[call]["id"], REQUEST, body)
    for name, (call, kind, body) in wire_reply_bodies().items():
        seeds[name if kind == ERROR else "reply-" + name] = wire_frame(CALLS[call]["id"], kind, body)
    hello, sign = seeds["request-hello"], seeds["request-sign-pss"]
    seeds.update({
        # A client's first frames back to back, with their tags.
        "pipeline": hello + wire_request("GetSlots", tag=2) + wire_request("Login", 7, 1, b"1234", tag=3) + sign,
        "replies-out-of-order": wire_reply("Sign", bytes(64), tag=9) + wire_error("Login", 0xA0, "CKR_PIN_INCORRECT", tag=3)
                                + wire_reply("GetSlots", [SLOT], tag=2),
        # A frame big enough to make the buffer grow (64 KiB is its usual size).
        "request-sign-200KiB": wire_request("Sign", 7, (0x43, PSS_PARAMS), 2, bytes(200 << 10)),
        # Headers this protocol cannot contain.
        "oversize-length": struct.pack("<IIHBB", WIRE["max_body"] + 1, 1, CALLS["Sign"]["id"], REQUEST, 0),
        "length-max": struct.pack("<IIHBB", 0xFFFFFFFF, 1, CALLS["Sign"]["id"], REQUEST, 0) + bytes(8),
        "length-at-cap-short": struct.pack("<IIHBB", WIRE["max_body"], 1, CALLS["Sign"]["id"], REQUEST, 0) + bytes(8),
        "unknown-kind": wire_frame(CALLS["Sign"]["id"], 3, b""),
        "reserved-not-zero": wire_frame(CALLS["Hello"]["id"], REQUEST, wire_request_bodies()["hello"][1], reserved=1),
        "unknown-call": wire_frame(999, REQUEST, b"") + hello,
        "header-only-partial": hello[:7],
        "frame-cut-short": sign[:-5],
        "good-then-bad-header": hello + struct.pack("<IIHBB", 0, 2, 0, 9, 0) + hello,
    })
    return seeds


def wire_body_seeds(kind):
    """A selector byte, then a body. FuzzServiceArguments: byte 0 mod the number of calls is
    the call, a request body follows. FuzzProxyReply: the same with bit 7 clear for a reply
    body, set for an error body."""
    if kind == "request":
        return {name: bytes([CALLS[call]["id"]]) + body for name, (call, body) in wire_request_bodies().items()}
    return {name: bytes([CALLS[call]["id"] | (0x80 if k == ERROR else 0)]) + body
            for name, (call, k, body) in wire_reply_bodies().items()}


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
    """Writes every target's seeds, or only those of the targets named on the command line
    (key-usage's certificates get fresh keys on every run, so its files change each time)."""
    targets = {
        "dbus-message": lambda: {**message_seeds(), **{"reply-" + k: v for k, v in reply_seeds().items()}},
        "service-arguments": lambda: wire_body_seeds("request"),
        "proxy-reply": lambda: wire_body_seeds("reply"),
        "configuration": configuration_seeds,
        "key-usage": key_usage_seeds,
        "proxy-arguments": proxy_argument_seeds,
        "cryptoki-wire": wire_stream_seeds,
    }
    chosen = sys.argv[1:] or list(targets)
    for name in chosen:
        if name not in targets:
            sys.exit(f"make-corpus.py: unknown target {name!r} (one of: {' '.join(targets)})")
        write(name, targets[name]())


if __name__ == "__main__":
    sys.exit(main())
