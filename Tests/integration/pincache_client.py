"""Client side of the integration tests: one Client = one bus connection = one
cache environment in pincached, plus signature verification against the
certificates make-demo-token.sh left on disk (never against what the daemon says
its public key is)."""

import hashlib
import time

import dbus
import dbus.bus
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

BUS_NAME = "org.pincache.Daemon"
MANAGER_PATH = "/org/pincache"
MANAGER = "org.pincache.Manager1"
TOKEN = "org.pincache.Token1"
SESSION = "org.pincache.Session1"
PROPS = "org.freedesktop.DBus.Properties"
ERR = "org.pincache.Error."
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"

EC_KEY = b"\x01"
RSA_KEY = b"\x02"
# Not the demo's 123456: a PIN this distinctive cannot turn up in a log by accident,
# so "the PIN never appears in the daemon's output" is a meaningful check.
PIN = "931270486"
SO_PIN = "84736251"

# Generous: a slow CI machine must fail on wrong answers, not on timing.
CALL_TIMEOUT = 30.0


class CallError(Exception):
    """A D-Bus error reply, reduced to what the tests compare: name and message."""

    def __init__(self, name, message):
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


def plain(value):
    """dbus-python values -> plain Python (str, int, bool, bytes, list, dict)."""
    if isinstance(value, dbus.Boolean):
        return bool(value)
    if isinstance(value, (dbus.String, dbus.ObjectPath, dbus.Signature)):
        return str(value)
    if isinstance(value, (dbus.Byte,)):
        return int(value)
    if isinstance(value, (dbus.Int16, dbus.Int32, dbus.Int64, dbus.UInt16,
                          dbus.UInt32, dbus.UInt64)):
        return int(value)
    if isinstance(value, dbus.Double):
        return float(value)
    if isinstance(value, (dbus.ByteArray, bytes)):
        return bytes(value)
    if isinstance(value, dbus.Array):
        if value.signature == "y":
            return bytes(int(b) for b in value)
        return [plain(v) for v in value]
    if isinstance(value, (dbus.Struct, tuple)):
        return tuple(plain(v) for v in value)
    if isinstance(value, (dbus.Dictionary, dict)):
        return {plain(k): plain(v) for k, v in value.items()}
    return value


def ay(data):
    return dbus.ByteArray(bytes(data))


class Client:
    """One private connection to the test bus, with the daemon's API as methods.

    Every method raises CallError (never DBusException), so tests compare error
    names with `client.error(...)` or `pytest.raises(CallError)`."""

    def __init__(self, address, name="client"):
        self.address = address
        self.name = name
        self.conn = dbus.bus.BusConnection(address)
        self.unique_name = str(self.conn.get_unique_name())

    # --- plumbing -------------------------------------------------------------
    def call(self, path, interface, method, *args, signature=None):
        """Calls method on the daemon; returns the plain-Python result."""
        # dbus-python guesses "s" for plain bytes, and a non-UTF-8 "string" aborts the
        # whole process inside libdbus: bytes are always sent as "ay".
        args = tuple(ay(a) if type(a) is bytes else a for a in args)
        try:
            obj = self.conn.get_object(BUS_NAME, path, introspect=False)
            kwargs = {"dbus_interface": interface, "timeout": CALL_TIMEOUT}
            if signature is not None:
                kwargs["signature"] = signature
            return plain(obj.get_dbus_method(method, interface)(*args, **kwargs))
        except dbus.exceptions.DBusException as e:
            raise CallError(e.get_dbus_name(), e.get_dbus_message()) from None

    def error(self, fn, *args, **kwargs):
        """Runs fn; returns the error name it raised, or None if it succeeded."""
        try:
            fn(*args, **kwargs)
        except CallError as e:
            return e.name
        return None

    def get(self, path, interface, prop):
        return self.call(path, PROPS, "Get", interface, prop)

    def get_all(self, path, interface):
        return self.call(path, PROPS, "GetAll", interface)

    def introspect(self, path):
        return self.call(path, "org.freedesktop.DBus.Introspectable", "Introspect")

    def close(self):
        self.conn.close()

    def gone_from_bus(self, other):
        """True once the bus no longer knows other's unique name. The bus then has
        already queued NameOwnerChanged to the daemon, ahead of anything we send next."""
        return not self.conn.name_has_owner(other.unique_name)

    # --- Manager1 -------------------------------------------------------------
    def manager_props(self):
        return self.get_all(MANAGER_PATH, MANAGER)

    def tokens(self):
        return self.call(MANAGER_PATH, MANAGER, "GetTokens")

    def token(self, label="pincache-demo"):
        """Path of the token whose Label property is exactly label."""
        seen = []
        for path in self.tokens():
            props = self.get_all(path, TOKEN)
            if props.get("Label") == label:
                return path
            seen.append(props.get("Label"))
        raise AssertionError(f"no token labelled {label!r}; labels seen: {seen!r}")

    def caller_state(self):
        return self.call(MANAGER_PATH, MANAGER, "GetCallerState")

    def statistics(self):
        return self.call(MANAGER_PATH, MANAGER, "GetStatistics")

    def cached(self):
        return set(self.caller_state()["Cached"])

    def logged_in(self):
        return set(self.caller_state()["LoggedIn"])

    def locked(self):
        return set(self.caller_state()["Locked"])

    def flush(self):
        return self.call(MANAGER_PATH, MANAGER, "FlushCaches")

    # --- Token1 ---------------------------------------------------------------
    def token_props(self, token):
        return self.get_all(token, TOKEN)

    def list_keys(self, token):
        return self.call(token, TOKEN, "ListKeys")

    def key(self, token, key_id):
        for k in self.list_keys(token):
            if k["Id"] == key_id:
                return k
        raise AssertionError(f"key {key_id.hex()} not in ListKeys of {token}")

    def open_session(self, token):
        return self.call(token, TOKEN, "OpenSession")

    def sign_once(self, token, pin, key_id, mechanism, data):
        return self.call(token, TOKEN, "SignOnce", pin, ay(key_id), mechanism, ay(data))

    # --- Session1 -------------------------------------------------------------
    def login(self, session, pin=PIN):
        return self.call(session, SESSION, "Login", pin)

    def logout(self, session):
        return self.call(session, SESSION, "Logout")

    def sign(self, session, key_id, mechanism, data):
        return self.call(session, SESSION, "Sign", ay(key_id), mechanism, ay(data))

    def sign_with_pin(self, session, pin, key_id, mechanism, data):
        return self.call(session, SESSION, "SignWithPin", pin, ay(key_id), mechanism, ay(data))

    def decrypt(self, session, key_id, mechanism, data):
        return self.call(session, SESSION, "Decrypt", ay(key_id), mechanism, ay(data))

    def close_session(self, session):
        return self.call(session, SESSION, "Close")

    def session_props(self, session):
        return self.get_all(session, SESSION)


def wait_until(predicate, timeout=10.0, interval=0.05, what="condition"):
    """Polls predicate; returns its last truthy value or raises AssertionError.

    Needed where the daemon learns of an event asynchronously (a connection
    leaving the bus reaches it as NameOwnerChanged)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --- signature verification ---------------------------------------------------

_HASHES = {"SHA256": hashes.SHA256, "SHA384": hashes.SHA384, "SHA512": hashes.SHA512}

# DER prefixes of DigestInfo (RFC 8017 §9.2 note 1).
_DIGEST_INFO = {
    "SHA256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "SHA384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "SHA512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


def load_cert(der_path):
    with open(der_path, "rb") as f:
        return x509.load_der_x509_certificate(f.read())


def digest_info(message, hash_name="SHA256"):
    return _DIGEST_INFO[hash_name] + hashlib.new(hash_name.lower(), message).digest()


def digest(message):
    """SHA-256 of message: the data for raw "ECDSA".

    The behaviour tests sign with raw ECDSA over a digest, which every module has;
    SoftHSM 2.6 lacks CKM_ECDSA_SHA256, so the hashing ECDSA-* names are tested once,
    in test_caching.test_mechanisms, instead of failing every behaviour test."""
    return hashlib.sha256(message).digest()


def input_for(mechanism, message):
    """What the daemon expects as `data` for mechanism to sign `message`."""
    if mechanism == "ECDSA":
        return hashlib.sha256(message).digest()
    if mechanism == "RSA-PKCS":
        return digest_info(message)
    return message


def verify(cert, mechanism, message, signature):
    """Verifies signature over message (the message, not the data sent); raises
    cryptography's InvalidSignature on mismatch."""
    pub = cert.public_key()
    if mechanism.startswith("ECDSA"):
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        half = (pub.curve.key_size + 7) // 8
        assert len(signature) == 2 * half, f"raw ECDSA signature is {len(signature)} bytes, want {2 * half}"
        der = utils.encode_dss_signature(int.from_bytes(signature[:half], "big"),
                                         int.from_bytes(signature[half:], "big"))
        hash_name = "SHA256" if mechanism == "ECDSA" else mechanism.split("-")[1]
        pub.verify(der, message, ec.ECDSA(_HASHES[hash_name]()))
        return
    assert isinstance(pub, rsa.RSAPublicKey)
    assert len(signature) == pub.key_size // 8
    if mechanism == "RSA-PKCS":
        pub.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    elif mechanism.endswith("-RSA-PKCS"):
        h = _HASHES[mechanism.split("-")[0]]()
        pub.verify(signature, message, padding.PKCS1v15(), h)
    elif mechanism.startswith("RSA-PSS-"):
        h = _HASHES[mechanism.split("-")[2]]
        pub.verify(signature, message,
                   padding.PSS(mgf=padding.MGF1(h()), salt_length=h().digest_size), h())
    else:
        raise ValueError(f"no verifier for {mechanism}")


def oaep_encrypt(cert, plaintext, hash=hashes.SHA256):
    return cert.public_key().encrypt(
        plaintext, padding.OAEP(mgf=padding.MGF1(hash()), algorithm=hash(), label=None))


def cert_der(cert):
    return cert.public_bytes(serialization.Encoding.DER)
