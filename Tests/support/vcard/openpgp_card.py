#!/usr/bin/python3
"""A virtual OpenPGP card (application 3.4) for tests, spoken over the vpcd protocol.

Connecting to the vpcd reader driver (inside pcscd) is inserting the card; closing the
connection (SIGTERM, or pcscd going away) is pulling it. The card is just enough of the
OpenPGP application for OpenSC's `openpgp` driver to present a PKCS#11 token with a
signature key, a decryption key and an authentication key (RSA-2048 or NIST P-256).

State lives in --state DIR so that re-inserting the card gives the same card:
  DIR/state.json     serial, key type, PIN hashes and lengths, retry counters, DOs
  DIR/keys/*.pem     private keys (test keys, never used for anything real)
  DIR/counters.json  retry counters, rewritten atomically after every change
  DIR/apdu.log       one JSON line per APDU: instruction name, status word, and for
                     VERIFY / CHANGE REFERENCE DATA the reference, whether the PIN
                     matched and a SHA-256 of the presented PIN (never the PIN)
  DIR/card.log       power/reset/connection events and anything unexpected

vpcd protocol (vsmartcard's vpcd.c): every message is a 2-byte big-endian length and a
payload. A 1-byte payload is a control command (0 power off, 1 power on, 2 reset,
4 get ATR; only ATR is answered); anything longer is a command APDU, answered with the
response data and status word.
"""

import argparse
import errno
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import signal
import socket
import struct
import sys
import time
import traceback

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

# --- constants ------------------------------------------------------------------

OPENPGP_RID_PIX = bytes.fromhex("D27600012401")
VERSION = bytes([0x03, 0x04])
MANUFACTURER = bytes([0xFF, 0xFF])  # "test card" in OpenSC's manufacturer table
P256_OID = bytes.fromhex("2A8648CE3D030107")

ALGO_RSA, ALGO_ECDH, ALGO_ECDSA = 0x01, 0x12, 0x13

# Key slots in OpenPGP order; the control reference templates name them in
# GENERATE ASYMMETRIC KEY PAIR and MANAGE SECURITY ENVIRONMENT.
SLOTS = ("sig", "dec", "aut")
CRT_TO_SLOT = {0xB6: "sig", 0xB8: "dec", 0xA4: "aut"}
KEYREF_TO_SLOT = {1: "sig", 2: "dec", 3: "aut"}

PW_MIN_LEN = {0x81: 6, 0x83: 8}
PW_MAX_LEN = 127
MAX_TRIES = 3

INS_NAMES = {
    0x20: "VERIFY", 0x24: "CHANGE_REFERENCE_DATA", 0x2C: "RESET_RETRY_COUNTER",
    0x2A: "PSO", 0x88: "INTERNAL_AUTHENTICATE", 0x47: "GENERATE_ASYMMETRIC_KEY_PAIR",
    0xA4: "SELECT", 0xA5: "SELECT_DATA", 0xCA: "GET_DATA", 0xCB: "GET_DATA_ODD",
    0xCC: "GET_NEXT_DATA", 0xDA: "PUT_DATA", 0xDB: "PUT_DATA_ODD", 0xC0: "GET_RESPONSE",
    0x84: "GET_CHALLENGE", 0x22: "MANAGE_SECURITY_ENVIRONMENT", 0x44: "ACTIVATE_FILE",
    0xE6: "TERMINATE_DF", 0xB0: "READ_BINARY", 0xB2: "READ_RECORD",
}

SW_OK = 0x9000
SW_WRONG_LENGTH = 0x6700
SW_SECURITY_NOT_SATISFIED = 0x6982
SW_AUTH_BLOCKED = 0x6983
SW_CONDITIONS_NOT_SATISFIED = 0x6985
SW_WRONG_DATA = 0x6A80
SW_FUNC_NOT_SUPPORTED = 0x6A81
SW_FILE_NOT_FOUND = 0x6A82
SW_WRONG_P1P2 = 0x6B00
SW_REF_NOT_FOUND = 0x6A88
SW_INCORRECT_P1P2 = 0x6A86
SW_INS_NOT_SUPPORTED = 0x6D00
SW_CLA_NOT_SUPPORTED = 0x6E00
SW_LAST_CHAIN_EXPECTED = 0x6883
SW_UNKNOWN = 0x6F00


class CardError(Exception):
    """A status word to answer with, instead of response data."""

    def __init__(self, sw, note=None):
        super().__init__(f"{sw:04X}")
        self.sw = sw
        self.note = note


# --- BER-TLV helpers ---------------------------------------------------------------

def tlv(tag, value):
    """Encodes one BER-TLV with a 1- or 2-byte tag and a definite length."""
    t = tag.to_bytes(2, "big") if tag > 0xFF else bytes([tag])
    n = len(value)
    if n < 0x80:
        ln = bytes([n])
    elif n < 0x100:
        ln = bytes([0x81, n])
    else:
        ln = bytes([0x82]) + n.to_bytes(2, "big")
    return t + ln + value


def parse_tlv(data):
    """Parses a flat sequence of BER-TLVs into (tag, value) pairs; raises ValueError."""
    out, i = [], 0
    while i < len(data):
        tag = data[i]
        i += 1
        if tag & 0x1F == 0x1F:
            if i >= len(data):
                raise ValueError("truncated tag")
            tag = (tag << 8) | data[i]
            i += 1
        if i >= len(data):
            raise ValueError("missing length")
        n = data[i]
        i += 1
        if n & 0x80:
            k = n & 0x7F
            if k == 0 or k > 2 or i + k > len(data):
                raise ValueError("bad length")
            n = int.from_bytes(data[i:i + k], "big")
            i += k
        if i + n > len(data):
            raise ValueError("value past end")
        out.append((tag, data[i:i + n]))
        i += n
    return out


def mpi(n):
    """An OpenPGP multiprecision integer: bit count and big-endian bytes."""
    b = n.to_bytes((n.bit_length() + 7) // 8 or 1, "big")
    return n.bit_length().to_bytes(2, "big") + b


def atr_with(hist):
    """Builds a T=1 ATR (the layout of OpenSC's "OpenPGP card v3.x" entry) around the
    historical bytes, with the check byte computed rather than copied."""
    body = bytes([0xD0 | len(hist), 0x18, 0xFF, 0x81, 0xB1, 0xFE, 0x75, 0x1F, 0x03]) + hist
    tck = 0
    for b in body:
        tck ^= b
    return bytes([0x3B]) + body + bytes([tck])


# --- the card -------------------------------------------------------------------

class Card:
    """The OpenPGP application: persistent state plus the volatile security status."""

    def __init__(self, state_dir, serial, pin, admin_pin, key_type, pw1_single_use,
                 extended_length):
        self.dir = state_dir
        self.keys_dir = os.path.join(state_dir, "keys")
        os.makedirs(self.keys_dir, exist_ok=True)
        self.log_file = open(os.path.join(state_dir, "apdu.log"), "a", buffering=1)
        self.event_file = open(os.path.join(state_dir, "card.log"), "a", buffering=1)
        self.extended_length = extended_length
        self._load_or_create(serial, pin, admin_pin, key_type)
        self.state["pw1_single_use"] = bool(pw1_single_use)
        self._save()
        self.keys = {s: self._load_key(s) for s in SLOTS}
        self.reset_security()

    # persistent state

    def _path(self, name):
        return os.path.join(self.dir, name)

    def _load_or_create(self, serial, pin, admin_pin, key_type):
        path = self._path("state.json")
        if os.path.exists(path):
            with open(path) as f:
                self.state = json.load(f)
            if serial is not None and serial.lower() != self.state["serial"]:
                raise SystemExit(f"state dir holds card {self.state['serial']}, not {serial}")
            if key_type is not None and key_type != self.state["key_type"]:
                raise SystemExit(f"state dir holds {self.state['key_type']} keys, not {key_type}")
            return
        serial = (serial or secrets.token_hex(4)).lower()
        if len(bytes.fromhex(serial)) != 4:
            raise SystemExit("--serial takes 8 hex digits")
        self.state = {
            "serial": serial,
            "key_type": key_type or "p256",
            "created": int(time.time()),
            "pw": {},
            "tries": {"81": MAX_TRIES, "83": MAX_TRIES},
            "signature_counter": 0,
            "dos": {"5B": b"Card<<Test".hex(), "5F2D": b"en".hex(), "5F35": "39"},
            "fingerprints": {},
            "timestamps": {},
        }
        self._set_pin(0x81, pin.encode())
        self._set_pin(0x83, admin_pin.encode())
        for slot in SLOTS:
            self._generate(slot)
        self._save()

    def _save(self):
        self._atomic_write("state.json", json.dumps(self.state, indent=1, sort_keys=True))
        c = {
            "serial": self.state["serial"],
            "pw1": self.state["tries"]["81"],
            "rc": 0,
            "pw3": self.state["tries"]["83"],
            "signature_counter": self.state["signature_counter"],
            "pw1_single_use": self.state.get("pw1_single_use", False),
        }
        self._atomic_write("counters.json", json.dumps(c, sort_keys=True) + "\n")

    def _atomic_write(self, name, text):
        tmp = self._path(name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path(name))

    def _set_pin(self, ref, pin):
        # Stored as a salted hash and a length: the length is what CHANGE REFERENCE DATA
        # needs to split old from new PIN, as on a real card.
        salt = secrets.token_bytes(16)
        self.state["pw"][f"{ref:02X}"] = {
            "salt": salt.hex(),
            "sha256": hashlib.sha256(salt + pin).hexdigest(),
            "len": len(pin),
        }

    def _pin_matches(self, ref, pin):
        rec = self.state["pw"][f"{ref:02X}"]
        digest = hashlib.sha256(bytes.fromhex(rec["salt"]) + pin).hexdigest()
        return hmac.compare_digest(digest, rec["sha256"])

    def _key_path(self, slot):
        return os.path.join(self.keys_dir, f"{slot}.pem")

    def _generate(self, slot):
        if self.state["key_type"] == "rsa2048":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif self.state["key_type"] == "p256":
            key = ec.generate_private_key(ec.SECP256R1())
        else:
            raise SystemExit(f"unknown key type {self.state['key_type']}")
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        self._atomic_write(f"keys/{slot}.pem", pem.decode())
        # The public half too, so tests can check signatures without asking the card.
        pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        self._atomic_write(f"keys/{slot}.pub.pem", pub.decode())
        ts = int(time.time())
        self.state["timestamps"][slot] = ts
        self.state["fingerprints"][slot] = self._fingerprint(slot, key.public_key(), ts).hex()
        return key

    def _load_key(self, slot):
        with open(self._key_path(slot), "rb") as f:
            return serialization.load_pem_private_key(f.read(), password=None)

    def _fingerprint(self, slot, pub, ts):
        """OpenPGP v4 fingerprint (RFC 4880 §12.2), so gpg would agree with the card."""
        if isinstance(pub, rsa.RSAPublicKey):
            n = pub.public_numbers()
            body = bytes([4]) + ts.to_bytes(4, "big") + bytes([ALGO_RSA]) + mpi(n.n) + mpi(n.e)
        else:
            algo = ALGO_ECDH if slot == "dec" else ALGO_ECDSA
            point = pub.public_bytes(serialization.Encoding.X962,
                                     serialization.PublicFormat.UncompressedPoint)
            body = bytes([4]) + ts.to_bytes(4, "big") + bytes([algo, len(P256_OID)]) + P256_OID \
                + mpi(int.from_bytes(point, "big"))
            if algo == ALGO_ECDH:
                body += bytes([3, 1, 8, 7])  # KDF: SHA-256, AES-128
        return hashlib.sha1(bytes([0x99]) + len(body).to_bytes(2, "big") + body).digest()

    # volatile state

    def reset_security(self):
        """Power-up, reset and application selection all clear the access status."""
        self.verified = {0x81: False, 0x82: False, 0x83: False}
        self.mse = {"aut_cmd": "aut", "dec_cmd": "dec"}
        self.pending = b""          # response bytes left for GET RESPONSE
        self.chain = None           # (cla&~0x10, ins, p1, p2, data) while chaining
        self.selected = False

    def event(self, text):
        self.event_file.write(f"{time.time():.6f} {text}\n")

    # identity

    @property
    def aid(self):
        return OPENPGP_RID_PIX + VERSION + MANUFACTURER + bytes.fromhex(self.state["serial"]) \
            + b"\x00\x00"

    @property
    def hist(self):
        # Compact TLV: 31 = card service data; 73 = card capabilities, whose third byte
        # says "command chaining" (0x80) and/or "extended Lc/Le" (0x40); then the status
        # indicator (05 = operational) and 9000, as OpenSC's driver parses them.
        caps3 = 0xC0 if self.extended_length else 0x80
        return bytes([0x00, 0x31, 0xC5, 0x73, 0xC0, 0x01, caps3, 0x05, 0x90, 0x00])

    @property
    def atr(self):
        return atr_with(self.hist)

    # data objects

    def algo_attr(self, slot):
        if self.state["key_type"] == "rsa2048":
            return bytes([ALGO_RSA]) + (2048).to_bytes(2, "big") + (32).to_bytes(2, "big") + b"\x00"
        return bytes([ALGO_ECDH if slot == "dec" else ALGO_ECDSA]) + P256_OID

    def pw_status(self):
        t = self.state["tries"]
        return bytes([0x00 if self.state["pw1_single_use"] else 0x01,
                      PW_MAX_LEN, PW_MAX_LEN, PW_MAX_LEN, t["81"], 0, t["83"]])

    def discretionary(self):
        fps = b"".join(bytes.fromhex(self.state["fingerprints"][s]) for s in SLOTS)
        tss = b"".join(self.state["timestamps"][s].to_bytes(4, "big") for s in SLOTS)
        ext_caps = bytes([
            0x08 | 0x10,            # private DOs; PW1 status byte changeable
            0x00,                   # no secure messaging
            0x00, 0x00,             # no GET CHALLENGE announced
            0x08, 0x00,             # max certificate length
            0x00, 0xFF,             # max length of special DOs
            0x00,                   # no PIN block 2 format
            0x01,                   # MANAGE SECURITY ENVIRONMENT for DEC/AUT
        ])
        return b"".join([
            tlv(0xC0, ext_caps),
            tlv(0xC1, self.algo_attr("sig")),
            tlv(0xC2, self.algo_attr("dec")),
            tlv(0xC3, self.algo_attr("aut")),
            tlv(0xC4, self.pw_status()),
            tlv(0xC5, fps),
            tlv(0xC6, bytes(60)),
            tlv(0xCD, tss),
            tlv(0xDE, bytes([0x01, 0x02, 0x02, 0x02, 0x03, 0x02])),  # all generated on card
        ])

    def get_data(self, tag):
        dos = self.state["dos"]
        if tag == 0x004F:
            return self.aid
        if tag == 0x005E:
            return bytes.fromhex(dos.get("5E", ""))
        if tag == 0x0065:
            return b"".join(tlv(t, bytes.fromhex(dos.get(f"{t:X}", "")))
                            for t in (0x5B, 0x5F2D, 0x5F35))
        if tag == 0x006E:
            parts = [tlv(0x4F, self.aid), tlv(0x5F52, self.hist)]
            if self.extended_length:
                # Max command and response length, large enough for RSA-2048 in one
                # APDU. Only cards with extended Lc/Le have this DO; without it OpenSC
                # keeps 255 and chains, whatever the reader allows.
                parts.append(tlv(0x7F66, tlv(0x02, b"\x08\x00") + tlv(0x02, b"\x08\x00")))
            parts.append(tlv(0x73, self.discretionary()))
            return b"".join(parts)
        if tag == 0x007A:
            return tlv(0x93, self.state["signature_counter"].to_bytes(3, "big"))
        if tag == 0x00C4:
            return self.pw_status()
        if tag == 0x5F50:
            return bytes.fromhex(dos.get("5F50", ""))
        if tag == 0x5F52:
            return self.hist
        if tag == 0x7F21:
            return bytes.fromhex(dos.get(f"7F21.{self.cert_instance}", ""))
        if tag in (0x0101, 0x0102):
            return bytes.fromhex(dos.get(f"{tag:04X}", ""))
        if tag == 0x0103:
            if not self.verified[0x82]:
                raise CardError(SW_SECURITY_NOT_SATISFIED)
            return bytes.fromhex(dos.get("0103", ""))
        if tag == 0x0104:
            if not self.verified[0x83]:
                raise CardError(SW_SECURITY_NOT_SATISFIED)
            return bytes.fromhex(dos.get("0104", ""))
        raise CardError(SW_REF_NOT_FOUND)

    def public_key_do(self, slot):
        pub = self.keys[slot].public_key()
        if isinstance(pub, rsa.RSAPublicKey):
            n = pub.public_numbers()
            body = tlv(0x81, n.n.to_bytes(256, "big")) + tlv(0x82, n.e.to_bytes(3, "big"))
        else:
            body = tlv(0x86, pub.public_bytes(serialization.Encoding.X962,
                                              serialization.PublicFormat.UncompressedPoint))
        return tlv(0x7F49, body)

    # crypto

    def sign_raw(self, slot, data):
        """RSA: PKCS#1 v1.5 type 1 over the given DigestInfo (the card pads, the host
        builds DigestInfo); ECDSA: over the given hash, returning r||s."""
        key = self.keys[slot]
        if isinstance(key, rsa.RSAPrivateKey):
            k = 256
            if len(data) > k - 11:
                raise CardError(SW_WRONG_DATA, "input too long for RSA")
            em = b"\x00\x01" + b"\xff" * (k - 3 - len(data)) + b"\x00" + data
            priv = key.private_numbers()
            sig = pow(int.from_bytes(em, "big"), priv.d, priv.public_numbers.n)
            return sig.to_bytes(k, "big")
        if not data:
            raise CardError(SW_WRONG_DATA, "empty hash")
        # ECDSA uses the leftmost bits of a longer hash; a shorter one is the same
        # integer left-padded, which lets Prehashed(SHA-256) take any input.
        digest = data[:32].rjust(32, b"\x00")
        der = key.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        r, s = utils.decode_dss_signature(der)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def decipher(self, slot, data):
        key = self.keys[slot]
        if isinstance(key, rsa.RSAPrivateKey):
            if not data or data[0] != 0x00:
                raise CardError(SW_WRONG_DATA, "RSA cryptogram needs padding indicator 00")
            try:
                return key.decrypt(data[1:], padding.PKCS1v15())
            except ValueError:
                raise CardError(SW_WRONG_DATA, "RSA decryption failed")
        try:
            (tag, a6), = parse_tlv(data)
            (tag2, pk), = parse_tlv(a6)
            (tag3, point), = parse_tlv(pk)
            if (tag, tag2, tag3) != (0xA6, 0x7F49, 0x86):
                raise ValueError("unexpected template")
            peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        except ValueError:
            raise CardError(SW_WRONG_DATA, "bad ECDH template")
        return key.exchange(ec.ECDH(), peer)

    # command dispatch

    def process(self, apdu):
        """Answers one command APDU (bytes) with response bytes; never raises."""
        entry = {"t": round(time.time(), 6)}
        try:
            cla, ins, p1, p2, data, ne = self._parse(apdu)
            entry.update(cla=f"{cla:02X}", ins=INS_NAMES.get(ins, f"INS_{ins:02X}"),
                         p1=f"{p1:02X}", p2=f"{p2:02X}", lc=len(data))
            resp = self._dispatch(cla, ins, p1, p2, data, ne, entry)
            out = self._with_get_response(resp, ne)
        except CardError as e:
            if e.note:
                entry["note"] = e.note
            self.pending = b""
            out = e.sw.to_bytes(2, "big")
        except Exception:  # a test card must answer, whatever the bug
            self.event("internal error:\n" + traceback.format_exc())
            self.pending = b""
            out = SW_UNKNOWN.to_bytes(2, "big")
        entry["sw"] = out[-2:].hex().upper()
        self.log_file.write(json.dumps(entry, sort_keys=True) + "\n")
        return out

    def _parse(self, apdu):
        """ISO 7816-4 cases 1-4, short and extended; returns Ne (0 = none)."""
        if len(apdu) < 4:
            raise CardError(SW_WRONG_LENGTH, "shorter than a header")
        cla, ins, p1, p2 = apdu[:4]
        body = apdu[4:]
        data, ne = b"", 0
        if not body:
            pass
        elif len(body) == 1:
            ne = body[0] or 256
        elif body[0] != 0 or len(body) < 3:
            lc = body[0]
            if len(body) == 1 + lc:
                data = body[1:]
            elif len(body) == 2 + lc:
                data, ne = body[1:1 + lc], (body[-1] or 256)
            else:
                raise CardError(SW_WRONG_LENGTH, "short Lc does not match")
        else:
            if len(body) == 3:
                ne = int.from_bytes(body[1:3], "big") or 65536
            else:
                lc = int.from_bytes(body[1:3], "big")
                rest = body[3:]
                if lc == 0 or len(rest) not in (lc, lc + 2):
                    raise CardError(SW_WRONG_LENGTH, "extended Lc does not match")
                data = rest[:lc]
                if len(rest) == lc + 2:
                    ne = int.from_bytes(rest[lc:], "big") or 65536
        return cla, ins, p1, p2, data, ne

    def _with_get_response(self, resp, ne):
        # Ne absent: answer everything anyway; OpenSC always sets Le when it expects data.
        limit = ne or 65536
        if len(resp) <= limit:
            self.pending = b""
            return resp + b"\x90\x00"
        self.pending = resp[limit:]
        return resp[:limit] + bytes([0x61, min(len(self.pending), 256) & 0xFF])

    def _dispatch(self, cla, ins, p1, p2, data, ne, entry):
        if ins == 0xC0:
            if not self.pending:
                raise CardError(SW_CONDITIONS_NOT_SATISFIED, "nothing to get")
            resp, self.pending = self.pending, b""
            return resp
        self.pending = b""
        if cla & 0x80:
            raise CardError(SW_CLA_NOT_SUPPORTED)
        if cla & 0x0C:
            raise CardError(0x6882, "secure messaging not supported")

        # Command chaining (CLA bit 0x10): collect data, answer 9000, act on the last.
        if cla & 0x10:
            if self.chain and self.chain[:4] != (cla & ~0x10, ins, p1, p2):
                self.chain = None
                raise CardError(SW_LAST_CHAIN_EXPECTED, "chain changed command")
            prev = self.chain[4] if self.chain else b""
            self.chain = (cla & ~0x10, ins, p1, p2, prev + data)
            entry["chained"] = True
            return b""
        if self.chain:
            if self.chain[:4] == (cla, ins, p1, p2):
                data = self.chain[4] + data
                entry["lc"] = len(data)
                self.chain = None
            else:
                self.chain = None
                raise CardError(SW_LAST_CHAIN_EXPECTED, "chain abandoned")

        if ins == 0xA4:
            return self._select(p1, p2, data)
        handler = {
            0xCA: self._get_data, 0xA5: self._select_data, 0x20: self._verify,
            0x24: self._change_reference, 0x2C: self._reset_retry_counter,
            0x2A: self._pso, 0x88: self._internal_authenticate,
            0x47: self._generate_key_pair, 0xDA: self._put_data, 0x22: self._mse,
            0x84: self._get_challenge, 0x44: self._activate,
        }.get(ins)
        if handler is None:
            raise CardError(SW_INS_NOT_SUPPORTED)
        if not self.selected:
            # Other drivers' probes land here before (or without) our SELECT.
            raise CardError(SW_CONDITIONS_NOT_SATISFIED, "application not selected")
        return handler(p1, p2, data, ne, entry)

    # --- instructions

    def _select(self, p1, p2, data):
        if p1 != 0x04:
            raise CardError(SW_FILE_NOT_FOUND, "only selection by DF name")
        if len(data) < 6 or not self.aid.startswith(data):
            self.selected = False
            raise CardError(SW_FILE_NOT_FOUND)
        self.reset_security()
        self.selected = True
        return b""

    def _get_data(self, p1, p2, data, ne, entry):
        tag = (p1 << 8) | p2
        entry["tag"] = f"{tag:04X}"
        return self.get_data(tag)

    def _select_data(self, p1, p2, data, ne, entry):
        if data != bytes.fromhex("60045C027F21") or p1 > 2:
            raise CardError(SW_WRONG_DATA)
        self.cert_instance = p1
        return b""

    cert_instance = 0

    def _check_blocked(self, ref):
        if self.state["tries"][f"{ref:02X}"] == 0:
            raise CardError(SW_AUTH_BLOCKED, "blocked")

    def _wrong(self, ref):
        key = f"{ref:02X}"
        self.state["tries"][key] = max(0, self.state["tries"][key] - 1)
        self._save()
        left = self.state["tries"][key]
        raise CardError(SW_AUTH_BLOCKED if left == 0 else 0x63C0 | left)

    def _right(self, ref):
        key = f"{ref:02X}"
        if self.state["tries"][key] != MAX_TRIES:
            self.state["tries"][key] = MAX_TRIES
            self._save()

    def _verify(self, p1, p2, data, ne, entry):
        if p2 not in (0x81, 0x82, 0x83):
            raise CardError(SW_REF_NOT_FOUND)
        entry["ref"] = f"{p2:02X}"
        counter_ref = 0x83 if p2 == 0x83 else 0x81
        if p1 == 0xFF:
            entry["op"] = "logout"
            if data:
                raise CardError(SW_WRONG_LENGTH)
            self.verified[p2] = False
            return b""
        if p1 != 0x00:
            raise CardError(SW_INCORRECT_P1P2)
        if not data:
            # ISO 7816-4 status query: no attempt is used up.
            entry["op"] = "status"
            self._check_blocked(counter_ref)
            if self.verified[p2]:
                return b""
            raise CardError(0x63C0 | self.state["tries"][f"{counter_ref:02X}"])
        entry["op"] = "verify"
        entry["pin_sha256"] = hashlib.sha256(data).hexdigest()
        self._check_blocked(counter_ref)
        ok = len(data) >= PW_MIN_LEN[counter_ref] and self._pin_matches(counter_ref, data)
        entry["matched"] = ok
        if not ok:
            self.verified[p2] = False
            self._wrong(counter_ref)
        self._right(counter_ref)
        self.verified[p2] = True
        return b""

    def _change_reference(self, p1, p2, data, ne, entry):
        if p1 != 0x00 or p2 not in (0x81, 0x83):
            raise CardError(SW_INCORRECT_P1P2)
        entry["ref"] = f"{p2:02X}"
        self._check_blocked(p2)
        old_len = self.state["pw"][f"{p2:02X}"]["len"]
        old, new = data[:old_len], data[old_len:]
        entry["old_pin_sha256"] = hashlib.sha256(old).hexdigest()
        ok = len(data) > old_len and self._pin_matches(p2, old)
        entry["matched"] = ok
        if not ok:
            self._wrong(p2)
        self._right(p2)
        if not (PW_MIN_LEN[p2] <= len(new) <= PW_MAX_LEN):
            raise CardError(SW_WRONG_DATA, "new PIN length")
        self._set_pin(p2, new)
        self._save()
        self.verified = {r: False for r in self.verified}
        entry["changed"] = True
        return b""

    def _reset_retry_counter(self, p1, p2, data, ne, entry):
        # Only the PW3 form: no resetting code is ever set on this card.
        if p2 != 0x81 or p1 not in (0x00, 0x02):
            raise CardError(SW_INCORRECT_P1P2)
        if p1 == 0x00:
            raise CardError(SW_SECURITY_NOT_SATISFIED, "no resetting code")
        if not self.verified[0x83]:
            raise CardError(SW_SECURITY_NOT_SATISFIED)
        if not (PW_MIN_LEN[0x81] <= len(data) <= PW_MAX_LEN):
            raise CardError(SW_WRONG_DATA)
        self._set_pin(0x81, data)
        self.state["tries"]["81"] = MAX_TRIES
        self._save()
        return b""

    def _pso(self, p1, p2, data, ne, entry):
        if (p1, p2) == (0x9E, 0x9A):
            entry["op"] = "sign"
            if not self.verified[0x81]:
                raise CardError(SW_SECURITY_NOT_SATISFIED)
            sig = self.sign_raw("sig", data)
            if self.state["pw1_single_use"]:
                self.verified[0x81] = False
            self.state["signature_counter"] += 1
            self._save()
            return sig
        if (p1, p2) == (0x80, 0x86):
            entry["op"] = "decipher"
            if not self.verified[0x82]:
                raise CardError(SW_SECURITY_NOT_SATISFIED)
            return self.decipher(self.mse["dec_cmd"], data)
        raise CardError(SW_INCORRECT_P1P2)

    def _internal_authenticate(self, p1, p2, data, ne, entry):
        if (p1, p2) != (0x00, 0x00):
            raise CardError(SW_INCORRECT_P1P2)
        if not self.verified[0x82]:
            raise CardError(SW_SECURITY_NOT_SATISFIED)
        slot = self.mse["aut_cmd"]
        if self.state["key_type"] == "p256" and slot == "dec":
            raise CardError(SW_CONDITIONS_NOT_SATISFIED, "ECDH key cannot sign")
        return self.sign_raw(slot, data)

    def _generate_key_pair(self, p1, p2, data, ne, entry):
        if len(data) != 2 or data[1] != 0x00 or data[0] not in CRT_TO_SLOT:
            raise CardError(SW_WRONG_DATA)
        slot = CRT_TO_SLOT[data[0]]
        entry["key"] = slot
        if p1 == 0x81:
            return self.public_key_do(slot)
        if p1 == 0x80:
            if not self.verified[0x83]:
                raise CardError(SW_SECURITY_NOT_SATISFIED)
            self.keys[slot] = self._generate(slot)
            if slot == "sig":
                self.state["signature_counter"] = 0
            self._save()
            return self.public_key_do(slot)
        raise CardError(SW_INCORRECT_P1P2)

    # DOs PUT DATA may write (as hex tags); everything else is refused.
    WRITABLE = {0x5B, 0x5E, 0x5F2D, 0x5F35, 0x5F50, 0x0101, 0x0102, 0x0103, 0x0104,
                0x7F21, 0xC4, 0xC7, 0xC8, 0xC9, 0xCE, 0xCF, 0xD0}

    def _put_data(self, p1, p2, data, ne, entry):
        tag = (p1 << 8) | p2
        entry["tag"] = f"{tag:04X}"
        if tag not in self.WRITABLE:
            raise CardError(SW_REF_NOT_FOUND)
        needs = 0x82 if tag in (0x0101, 0x0103) else 0x83
        if not self.verified[needs]:
            raise CardError(SW_SECURITY_NOT_SATISFIED)
        if tag == 0xC4:
            if len(data) != 1 or data[0] not in (0, 1):
                raise CardError(SW_WRONG_DATA)
            self.state["pw1_single_use"] = data[0] == 0
        elif tag in (0xC7, 0xC8, 0xC9):
            if len(data) != 20:
                raise CardError(SW_WRONG_DATA)
            self.state["fingerprints"][SLOTS[tag - 0xC7]] = data.hex()
        elif tag in (0xCE, 0xCF, 0xD0):
            if len(data) != 4:
                raise CardError(SW_WRONG_DATA)
            self.state["timestamps"][SLOTS[tag - 0xCE]] = int.from_bytes(data, "big")
        elif tag == 0x7F21:
            self.state["dos"][f"7F21.{self.cert_instance}"] = data.hex()
        else:
            self.state["dos"][f"{tag:X}" if tag < 0x100 or tag > 0x1000 else f"{tag:04X}"] = data.hex()
        self._save()
        return b""

    def _mse(self, p1, p2, data, ne, entry):
        if p1 != 0x41 or p2 not in (0xA4, 0xB8) or len(data) != 3 or data[:2] != b"\x83\x01" \
                or data[2] not in (2, 3):
            raise CardError(SW_WRONG_DATA)
        self.mse["aut_cmd" if p2 == 0xA4 else "dec_cmd"] = KEYREF_TO_SLOT[data[2]]
        return b""

    def _get_challenge(self, p1, p2, data, ne, entry):
        return secrets.token_bytes(min(ne or 8, 255))

    def _activate(self, p1, p2, data, ne, entry):
        return b""


# --- vpcd link --------------------------------------------------------------------

def quickack(sock):
    # vpcd writes the length and the payload with two send() calls; with Nagle on its
    # side and delayed ACKs on ours every APDU would wait ~40 ms for our ACK.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    except (OSError, AttributeError):
        pass


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except InterruptedError:
            continue
        quickack(sock)
        if not chunk:
            return None
        buf += chunk
    return buf


def connect(host, port, timeout):
    """vpcd listens; the card connects. pcscd may still be starting, so retry."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            s = socket.create_connection((host, port), timeout=2)
            s.settimeout(None)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s
        except OSError as e:
            if time.monotonic() >= deadline:
                raise SystemExit(f"cannot connect to vpcd at {host}:{port}: {e}")
            time.sleep(0.1)


def serve(card, sock):
    while True:
        head = recv_exact(sock, 2)
        if head is None:
            card.event("vpcd closed the connection")
            return
        (n,) = struct.unpack("!H", head)
        msg = recv_exact(sock, n) if n else b""
        if msg is None:
            card.event("vpcd closed the connection mid-message")
            return
        if n == 1:
            ctrl = msg[0]
            if ctrl == 0x04:
                sock.sendall(struct.pack("!H", len(card.atr)) + card.atr)
            elif ctrl in (0x00, 0x01, 0x02):
                card.event({0: "power off", 1: "power on", 2: "reset"}[ctrl])
                card.reset_security()
            else:
                card.event(f"unknown control byte {ctrl:#04x}")
            continue
        if n == 0:
            card.event("empty message")
            continue
        resp = card.process(msg)
        sock.sendall(struct.pack("!H", len(resp)) + resp)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--state", required=True, help="state directory (created if absent)")
    ap.add_argument("--serial", help="8 hex digits; only used when the state is created")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=35963)
    ap.add_argument("--pin", default="123456", help="initial PW1 (first start only)")
    ap.add_argument("--admin-pin", default="12345678", help="initial PW3 (first start only)")
    ap.add_argument("--key-type", choices=("rsa2048", "p256"),
                    help="first start only; default p256")
    ap.add_argument("--pw1-single-use", action="store_true",
                    help="PW1 status byte 00: one PSO:CDS per VERIFY 81")
    ap.add_argument("--no-extended-length", action="store_true",
                    help="announce command chaining only (ATR and 5F52), no extended Lc/Le")
    ap.add_argument("--connect-timeout", type=float, default=15.0)
    args = ap.parse_args(argv)

    os.makedirs(args.state, exist_ok=True)
    # One process per card: two would fight over counters and the same reader slot.
    lock = open(os.path.join(args.state, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise SystemExit(f"card in {args.state} is already inserted")
        raise

    card = Card(args.state, args.serial, args.pin, args.admin_pin, args.key_type,
                args.pw1_single_use, not args.no_extended_length)

    sock = None

    def on_term(signum, frame):
        # Pulling the card: drop the link; vpcd reports the card absent.
        card.event(f"signal {signum}: removed")
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    sock = connect(args.host, args.port, args.connect_timeout)
    card.event(f"inserted at {args.host}:{args.port}, serial {card.state['serial']}")
    print(f"vcard {card.state['serial']} connected to {args.host}:{args.port}", flush=True)
    try:
        serve(card, sock)
    except OSError as e:
        card.event(f"link error: {e}")
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
