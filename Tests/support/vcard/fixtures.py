"""pytest helpers for tests with smart cards: a private pcscd with the vpcd reader
driver, the virtual OpenPGP card (openpgp_card.py) and Debian's iso7816 `vicc`.

Use from a test module or conftest.py:

    sys.path.insert(0, str(REPO / "Tests/support/vcard"))
    from fixtures import *   # pcscd, vcard_factory, vicc_factory, opensc_env, ...

Only one pcscd can run on a machine (its socket and pid file are fixed paths under
/run/pcscd), so `Pcscd.start` takes an flock on /run/lock/pincache-test-pcscd.lock and
waits for it: concurrent test runs take turns instead of stealing each other's readers.
A pcscd not started by these helpers makes the test fail (or skip, without CI=true).

The reader driver is configured in a private reader.conf.d (`pcscd -c`), so the port
can differ from Debian's default 35963 if needed. vpcd creates two readers per port:
"Virtual PCD 00 00" on PORT and "Virtual PCD 00 01" on PORT+1.
"""

import ctypes
import errno
import fcntl
import json
import os
import signal
import subprocess
import time
from ctypes import byref, c_char_p, c_long, c_ubyte, c_ulong, c_void_p
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CARD_SCRIPT = HERE / "openpgp_card.py"
OPENSC_CONF = HERE.parent / "opensc.conf"
OPENSC_PKCS11 = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"
PYTHON = "/usr/bin/python3"  # Debian's, which has python3-cryptography
PCSCD = "/usr/sbin/pcscd"
VPCD_DRIVER = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so"
VICC = "/usr/bin/vicc"
VICC_PYTHONPATH = "/usr/lib/python3/site-packages/virtualsmartcard"
PCSCD_RUN = Path("/run/pcscd")
PCSCD_LOCK = Path("/run/lock/pincache-test-pcscd.lock")
DEFAULT_PORT = 35963
READER = "Virtual PCD 00 00"
READER2 = "Virtual PCD 00 01"
PIN = "123456"
ADMIN_PIN = "12345678"

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition, why):
    """Skips the test when condition is false; under CI=true fails it instead."""
    if not condition:
        if CI:
            pytest.fail(f"missing requirement (CI=true): {why}")
        pytest.skip(why)


def wait_for(predicate, timeout, what, interval=0.02):
    """Polls predicate until it returns something true; fails the test on time-out."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def opensc_environ(extra=None):
    """Environment for OpenSC clients (pkcs11-tool, opensc-tool, the daemon)."""
    env = dict(os.environ)
    env["OPENSC_CONF"] = str(OPENSC_CONF)
    env.update(extra or {})
    return env


# --- PC/SC through libpcsclite (the same library the daemon and OpenSC use) --------

SCARD_SCOPE_SYSTEM = 2
SCARD_STATE_UNAWARE = 0x0000
SCARD_STATE_UNKNOWN = 0x0004
SCARD_STATE_UNAVAILABLE = 0x0008
SCARD_STATE_EMPTY = 0x0010
SCARD_STATE_PRESENT = 0x0020
SCARD_E_TIMEOUT = 0x8010000A
SCARD_E_NO_READERS_AVAILABLE = 0x8010002E


class SCARD_READERSTATE(ctypes.Structure):
    # pcsclite.h: DWORD is unsigned long on Linux; rgbAtr is MAX_ATR_SIZE (33) bytes.
    _fields_ = [("szReader", c_char_p), ("pvUserData", c_void_p),
                ("dwCurrentState", c_ulong), ("dwEventState", c_ulong),
                ("cbAtr", c_ulong), ("rgbAtr", c_ubyte * 33)]


class PCSC:
    """A PC/SC context: lists readers and reads card presence, like a plain client."""

    def __init__(self):
        self.lib = ctypes.CDLL("libpcsclite.so.1")
        for name in ("SCardEstablishContext", "SCardReleaseContext", "SCardListReaders",
                     "SCardGetStatusChange"):
            getattr(self.lib, name).restype = c_long
        self.ctx = c_long(0)
        rv = self.lib.SCardEstablishContext(c_ulong(SCARD_SCOPE_SYSTEM), None, None,
                                            byref(self.ctx))
        if rv != 0:
            raise OSError(f"SCardEstablishContext: 0x{rv & 0xFFFFFFFF:08X}")

    def close(self):
        if self.ctx is not None:
            self.lib.SCardReleaseContext(self.ctx)
            self.ctx = None

    def readers(self):
        n = c_ulong(0)
        rv = self.lib.SCardListReaders(self.ctx, None, None, byref(n)) & 0xFFFFFFFF
        if rv == SCARD_E_NO_READERS_AVAILABLE:
            return []
        if rv != 0:
            raise OSError(f"SCardListReaders: 0x{rv:08X}")
        buf = ctypes.create_string_buffer(n.value)
        rv = self.lib.SCardListReaders(self.ctx, None, buf, byref(n)) & 0xFFFFFFFF
        if rv == SCARD_E_NO_READERS_AVAILABLE:
            return []
        if rv != 0:
            raise OSError(f"SCardListReaders: 0x{rv:08X}")
        return [r.decode() for r in buf.raw[:n.value].split(b"\0") if r]

    def state(self, reader):
        """(event state flags, ATR bytes) of a reader, without waiting."""
        rs = SCARD_READERSTATE(reader.encode(), None, SCARD_STATE_UNAWARE, 0, 0)
        rv = self.lib.SCardGetStatusChange(self.ctx, c_ulong(0), byref(rs), c_ulong(1))
        rv &= 0xFFFFFFFF
        if rv not in (0, SCARD_E_TIMEOUT):
            raise OSError(f"SCardGetStatusChange: 0x{rv:08X}")
        return rs.dwEventState, bytes(rs.rgbAtr[:rs.cbAtr])

    def card_present(self, reader):
        try:
            flags, _ = self.state(reader)
        except OSError:
            return False
        return bool(flags & SCARD_STATE_PRESENT)

    def atr(self, reader):
        return self.state(reader)[1]


# --- pcscd ----------------------------------------------------------------------

def _pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def foreign_pcscd_pid():
    """The pid of a running pcscd per /run/pcscd/pcscd.pid, or None."""
    try:
        pid = int((PCSCD_RUN / "pcscd.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _pid_alive(pid) else None


class Pcscd:
    """pcscd in the foreground (-f) with debug output (-d) into workdir/pcscd.log and
    only the vpcd reader driver (-c workdir/reader.conf.d)."""

    def __init__(self, workdir, port=DEFAULT_PORT, lock_timeout=120.0):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.lock_timeout = lock_timeout
        self.proc = None
        self.lock = None
        self.log_path = self.workdir / "pcscd.log"

    @property
    def readers(self):
        return (READER, READER2)

    def reader_port(self, reader_index):
        return self.port + reader_index

    def _take_lock(self):
        PCSCD_LOCK.parent.mkdir(parents=True, exist_ok=True)
        self.lock = open(PCSCD_LOCK, "a")
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                self.lock.close()
                self.lock = None
                pytest.fail(f"{PCSCD_LOCK} held by another test run for {self.lock_timeout}s")
            time.sleep(0.2)

    def _release_lock(self):
        if self.lock is not None:
            fcntl.flock(self.lock, fcntl.LOCK_UN)
            self.lock.close()
            self.lock = None

    def start(self, timeout=15.0):
        need(os.access(PCSCD, os.X_OK), f"{PCSCD} missing (apt-get install pcscd)")
        need(os.path.exists(VPCD_DRIVER), f"{VPCD_DRIVER} missing (apt-get install vsmartcard-vpcd)")
        need(os.geteuid() == 0, "pcscd needs root for /run/pcscd")
        if self.lock is None:
            self._take_lock()
        other = foreign_pcscd_pid()
        if other is not None:
            self._release_lock()
            pytest.fail(f"a pcscd not started by these tests is running (pid {other}); "
                        "stop it (systemctl stop pcscd.socket pcscd) first")
        # A pcscd killed with SIGKILL leaves its socket and pid file behind.
        for stale in ("pcscd.comm", "pcscd.pid"):
            try:
                (PCSCD_RUN / stale).unlink()
            except FileNotFoundError:
                pass
        conf = self.workdir / "reader.conf.d"
        conf.mkdir(exist_ok=True)
        (conf / "vpcd").write_text(
            'FRIENDLYNAME "Virtual PCD"\n'
            f"DEVICENAME   /dev/null:0x{self.port:04X}\n"
            f"LIBPATH      {VPCD_DRIVER}\n"
            f"CHANNELID    0x{self.port:04X}\n")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([PCSCD, "-f", "-d", "-c", str(conf)], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

        def ready():
            if self.proc.poll() is not None:
                pytest.fail(f"pcscd exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                pcsc = PCSC()
            except OSError:
                return False
            try:
                return READER in pcsc.readers()
            except OSError:
                return False
            finally:
                pcsc.close()

        wait_for(ready, timeout, f'reader "{READER}" from pcscd')
        return self

    def stop(self, sig=signal.SIGTERM, timeout=10.0, keep_lock=False):
        """Stops pcscd (SIGKILL to simulate a crash); keep_lock to start it again."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if not keep_lock:
            self._release_lock()

    def restart(self, sig=signal.SIGTERM):
        self.stop(sig, keep_lock=True)
        return self.start()

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n=40):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def card_present(self, reader=READER):
        pcsc = PCSC()
        try:
            return pcsc.card_present(reader)
        finally:
            pcsc.close()

    def wait_card(self, reader=READER, present=True, timeout=10.0):
        wait_for(lambda: self.card_present(reader) == present, timeout,
                 f"card {'in' if present else 'out of'} {reader}")


# --- cards ----------------------------------------------------------------------

class _CardProcess:
    """A process that is a card while it is connected to vpcd."""

    name = "card"

    def __init__(self, pcscd, workdir, reader_index):
        self.pcscd = pcscd
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.reader_index = reader_index
        self.proc = None

    @property
    def reader(self):
        return self.pcscd.readers[self.reader_index]

    @property
    def port(self):
        return self.pcscd.reader_port(self.reader_index)

    @property
    def inserted(self):
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self, argv, env=None):
        out = open(self.workdir / f"{self.name}.out", "ab")
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)
        out.close()

    def output(self):
        try:
            return (self.workdir / f"{self.name}.out").read_text(errors="replace")
        except OSError:
            return ""

    def insert(self, wait=True, timeout=15.0):
        assert not self.inserted, f"{self.name} already inserted"
        self._spawn(self.argv(), self.env())
        if wait:
            def present():
                if self.proc.poll() is not None:
                    pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.output()}")
                return self.pcscd.card_present(self.reader)
            wait_for(present, timeout, f"{self.name} in {self.reader}")
        return self

    def pull(self, wait=True, timeout=10.0):
        """Removes the card: SIGTERM closes its link to vpcd."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        if wait and self.pcscd.running:
            self.pcscd.wait_card(self.reader, present=False, timeout=timeout)
        return self


class VirtualOpenPGPCard(_CardProcess):
    """The virtual OpenPGP card; its state directory survives pull and insert."""

    name = "vcard"

    def __init__(self, pcscd, state_dir, serial=None, reader_index=0, key_type="p256",
                 pin=PIN, admin_pin=ADMIN_PIN, pw1_single_use=False, extended_length=True):
        super().__init__(pcscd, state_dir, reader_index)
        self.state_dir = self.workdir
        self.serial_arg = serial
        self.key_type = key_type
        self.pin, self.admin_pin = pin, admin_pin
        self.pw1_single_use = pw1_single_use
        self.extended_length = extended_length

    def argv(self):
        a = [PYTHON, str(CARD_SCRIPT), "--state", str(self.state_dir), "--port", str(self.port),
             "--pin", self.pin, "--admin-pin", self.admin_pin]
        if not (self.state_dir / "state.json").exists():
            a += ["--key-type", self.key_type]
            if self.serial_arg:
                a += ["--serial", self.serial_arg]
        if self.pw1_single_use:
            a.append("--pw1-single-use")
        if not self.extended_length:
            a.append("--no-extended-length")
        return a

    def env(self):
        return None

    # what tests read back

    @property
    def serial(self):
        """The 8 hex digits of the card serial number (after the first insertion)."""
        return json.loads((self.state_dir / "state.json").read_text())["serial"]

    @property
    def token_serial(self):
        """The PKCS#11 token serial OpenSC shows: manufacturer FFFF + serial."""
        return "ffff" + self.serial

    def counters(self):
        """{"pw1": tries left, "pw3": ..., "rc": 0, "signature_counter": n, ...}"""
        return json.loads((self.state_dir / "counters.json").read_text())

    def apdus(self):
        """Every APDU the card answered, oldest first, as logged (dicts)."""
        try:
            text = (self.state_dir / "apdu.log").read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def verifies(self):
        """VERIFY commands that presented a PIN (not status queries or logouts)."""
        return [e for e in self.apdus() if e.get("ins") == "VERIFY" and e.get("op") == "verify"]

    def public_key_pem(self, slot="sig"):
        """The card's own copy of a public key, to cross-check what OpenSC reports."""
        return (self.state_dir / "keys" / f"{slot}.pub.pem").read_bytes()


def crypto_shim(workdir):
    """A directory to put on PYTHONPATH so that `import Crypto` finds Debian's
    pycryptodome (which Debian installs as `Cryptodome`), or None if Crypto works."""
    probe = subprocess.run([PYTHON, "-c", "import Crypto"], capture_output=True)
    if probe.returncode == 0:
        return None
    found = subprocess.run([PYTHON, "-c", "import Cryptodome, os; print(os.path.dirname(Cryptodome.__file__))"],
                           capture_output=True, text=True)
    need(found.returncode == 0, "pycryptodome missing (apt-get install python3-pycryptodome)")
    shim = Path(workdir) / "crypto-shim"
    shim.mkdir(parents=True, exist_ok=True)
    link = shim / "Crypto"
    if not link.exists():
        link.symlink_to(found.stdout.strip())
    return shim


class Vicc(_CardProcess):
    """Debian's vicc emulating a plain ISO 7816 card that no OpenSC driver claims."""

    name = "vicc"

    def __init__(self, pcscd, workdir, reader_index=1, card_type="iso7816"):
        super().__init__(pcscd, workdir, reader_index)
        self.card_type = card_type

    def argv(self):
        need(os.path.exists(VICC), f"{VICC} missing (apt-get install vsmartcard-vpicc)")
        return [PYTHON, str(HERE / "vicc_quickack.py"), "-t", self.card_type,
                "-H", "127.0.0.1", "-P", str(self.port)]

    def env(self):
        env = dict(os.environ)
        paths = [VICC_PYTHONPATH]
        shim = crypto_shim(self.workdir)
        if shim is not None:
            paths.insert(0, str(shim))
        env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        return env


# --- pytest fixtures --------------------------------------------------------------

@pytest.fixture
def opensc_env():
    """os.environ plus OPENSC_CONF pointing at Tests/support/opensc.conf."""
    need(os.path.exists(OPENSC_PKCS11), f"{OPENSC_PKCS11} missing (apt-get install opensc-pkcs11)")
    return opensc_environ()


@pytest.fixture
def pcscd(tmp_path, monkeypatch):
    """A running private pcscd with the two vpcd readers; OPENSC_CONF set for this
    process too (ctypes PKCS#11 clients load OpenSC in-process)."""
    monkeypatch.setenv("OPENSC_CONF", str(OPENSC_CONF))
    p = Pcscd(tmp_path / "pcscd")
    p.start()
    yield p
    p.stop()


@pytest.fixture
def vcard_factory(pcscd, tmp_path):
    """make(name="a", **VirtualOpenPGPCard kwargs) -> a card, not yet inserted. Each
    name has its own state dir, so make("a") twice is the same card."""
    cards = []

    def make(name="a", **kw):
        card = VirtualOpenPGPCard(pcscd, tmp_path / f"vcard-{name}", **kw)
        cards.append(card)
        return card

    yield make
    for c in cards:
        c.pull(wait=False)


@pytest.fixture
def vicc_factory(pcscd, tmp_path):
    """make(reader_index=1) -> Debian's iso7816 vicc, not yet inserted."""
    viccs = []

    def make(reader_index=1, card_type="iso7816"):
        v = Vicc(pcscd, tmp_path / f"vicc-{len(viccs)}", reader_index, card_type)
        viccs.append(v)
        return v

    yield make
    for v in viccs:
        v.pull(wait=False)


__all__ = ["need", "wait_for", "opensc_environ", "PCSC", "Pcscd", "VirtualOpenPGPCard",
           "Vicc", "crypto_shim", "opensc_env", "pcscd", "vcard_factory", "vicc_factory",
           "OPENSC_CONF", "OPENSC_PKCS11", "PYTHON", "READER", "READER2", "PIN", "ADMIN_PIN",
           "CI", "foreign_pcscd_pid"]
