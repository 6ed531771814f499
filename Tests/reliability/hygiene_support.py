"""Shared pieces of the rel-hygiene tests (items 7-10 of issue 6): the integration
fixtures under a private module name, a scanner for a secret in another process's
memory, figures output, and helpers to run things as an unprivileged user.

The integration conftest is loaded as `pincache_integration_conftest`, not as
`conftest`, so this module works whatever Tests/reliability/conftest.py holds.
Import the fixtures a test needs by name:

    from hygiene_support import bus, tokens, ...   # noqa: F401 (fixtures)
"""

import importlib.util
import json
import os
import pwd
import re
import secrets
import shutil
import string
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pincache_client import wait_until  # noqa: F401 (re-exported to the tests)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
INTEGRATION = REPO / "Tests" / "integration"
VCARD = REPO / "Tests" / "support" / "vcard"
for p in (INTEGRATION, VCARD):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def _load(name, path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


itc = _load("pincache_integration_conftest", INTEGRATION / "conftest.py")
# test_proxy_support.py does `from conftest import need`: let it find the integration one,
# whatever pytest registered as "conftest" for this directory.
_saved_conftest = sys.modules.get("conftest")
sys.modules["conftest"] = itc
try:
    proxy_support = _load("pincache_integration_proxy_support", INTEGRATION / "test_proxy_support.py")
finally:
    if _saved_conftest is None:
        del sys.modules["conftest"]
    else:
        sys.modules["conftest"] = _saved_conftest

# Fixtures and helpers re-exported for the test modules.
build_dir = itc.build_dir
pincached_bin = itc.pincached_bin
faultshim_lib = itc.faultshim_lib
daemon_env = itc.daemon_env
make_client = itc.make_client
Bus = itc.Bus
Daemon = itc.Daemon
Tokens = itc.Tokens
config_text = itc.config_text
SOFTHSM_MODULE = itc.SOFTHSM_MODULE
LABELS = itc.LABELS
proxy_lib = proxy_support.proxy_lib
proxy_host = proxy_support.proxy_host
Host = proxy_support.Host

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SIZE = os.environ.get("RELIABILITY", "ci").lower()
LONG = SIZE == "long"
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
PYTHON = "/usr/bin/python3"


def need(condition, why):
    """Skips the test when condition is false; under CI=true fails it instead."""
    if not condition:
        if CI:
            pytest.fail(f"missing requirement (CI=true): {why}")
        pytest.skip(why)


def sized(ci, long):
    return long if LONG else ci


# --- figures ------------------------------------------------------------------------

ITEM_NAMES = {7: "7 PIN hygiene", 8: "8 chaos", 9: "9 proxy in a host", 10: "10 configuration trust"}


def figure(item, name, value, unit="", limit=None, note=None):
    """One figure in the format of figures.py (rel-load's; scripts/reliability.sh tabulates
    $RELIABILITY_OUT/figures.jsonl). `limit` is an upper bound the value was held to;
    `note` goes into the figure's name, shortened."""
    import figures
    if note:
        name = f"{name} ({note if len(note) <= 70 else note[:67] + '...'})"
    ok = None if limit is None else (isinstance(value, (int, float)) and value <= limit)
    figures.record(ITEM_NAMES.get(item, str(item)), name, value, unit=unit, limit=limit, ok=ok)


# --- a high-entropy PIN and tokens that use it ----------------------------------------

def random_pin(n=40):
    """A PIN that cannot occur in memory or a log by accident (~238 bits)."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(n))


def make_token_store(dest, pin, so_pin, labels=LABELS):
    """A fresh SoftHSM store with the demo tokens, user PIN `pin`."""
    need(shutil.which("softhsm2-util") and os.path.exists(SOFTHSM_MODULE), "softhsm2 not installed")
    need(shutil.which("pkcs11-tool") and shutil.which("openssl"), "opensc/openssl not installed")
    env = {**os.environ, "PINCACHE_DEMO_PIN": pin, "PINCACHE_DEMO_SO_PIN": so_pin}
    for label in labels:
        subprocess.run([str(REPO / "scripts" / "make-demo-token.sh"), str(dest), label], check=True,
                       stdout=subprocess.DEVNULL, env=env)
    return dest


# --- reading another process's memory ------------------------------------------------

@dataclass
class Region:
    start: int
    end: int
    perms: str
    path: str
    flags: frozenset   # smaps VmFlags, e.g. {"rd", "wr", "lo", "dd"}
    rss_kb: int
    swap_kb: int

    def describe(self):
        return f"{self.start:x}-{self.end:x} {self.perms} {self.path or '[anon]'} [{' '.join(sorted(self.flags))}]"


_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


def regions(pid):
    """Every mapping of pid, from /proc/PID/smaps."""
    out, cur = [], None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = _HEADER.match(line)
            if m:
                cur = dict(start=int(m.group(1), 16), end=int(m.group(2), 16), perms=m.group(3),
                           path=m.group(4).strip(), flags=frozenset(), rss_kb=0, swap_kb=0)
                out.append(cur)
            elif line.startswith("VmFlags:"):
                cur["flags"] = frozenset(line.split()[1:])
            elif line.startswith("Rss:"):
                cur["rss_kb"] = int(line.split()[1])
            elif line.startswith("Swap:"):
                cur["swap_kb"] = int(line.split()[1])
    return [Region(**r) for r in out]


@dataclass
class Hit:
    address: int
    region: Region
    encoding: str
    context: bytes

    def describe(self):
        return f"{self.encoding} at {self.address:x} in {self.region.describe()}"

    @property
    def protected(self):
        """In locked (never swapped) and don't-dump memory."""
        return "lo" in self.region.flags and "dd" in self.region.flags


def needles(secret):
    b = secret.encode() if isinstance(secret, str) else bytes(secret)
    return {"utf-8": b, "utf-16le": b.decode("latin-1").encode("utf-16le")}


def scan(pid, secret):
    """Every occurrence of secret (UTF-8 or UTF-16LE) in pid's memory, any mapping
    with resident or swapped pages. Needs ptrace access (root)."""
    hits = []
    wanted = needles(secret)
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for r in regions(pid):
            if "r" not in r.perms or r.path in ("[vvar]", "[vsyscall]", "[vvar_vclock]"):
                continue
            if r.rss_kb == 0 and r.swap_kb == 0:
                continue   # never touched: only zero pages
            try:
                mem.seek(r.start)
                data = mem.read(r.end - r.start)
            except OSError:
                continue
            for enc, n in wanted.items():
                i = data.find(n)
                while i >= 0:
                    hits.append(Hit(r.start + i, r, enc, data[max(0, i - 48):i + len(n) + 48]))
                    i = data.find(n, i + 1)
    return hits


def describe_hits(hits):
    return "\n".join(h.describe() + "\n    " + h.context.hex() for h in hits)


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def threads_of(pid):
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


# --- an unprivileged user -------------------------------------------------------------

def unprivileged_user():
    """(name, uid, gid) of `nobody`, the user tests run unprivileged things as."""
    try:
        pw = pwd.getpwnam("nobody")
    except KeyError:
        need(False, "no user 'nobody'")
    return pw.pw_name, pw.pw_uid, pw.pw_gid


def chown_tree(path, uid, gid):
    for root, dirs, files in os.walk(path):
        os.chown(root, uid, gid)
        for n in files:
            os.chown(os.path.join(root, n), uid, gid)


def as_user_argv(argv, uid, gid, memlock=None):
    """argv run by setpriv as uid/gid, every capability dropped; memlock (bytes) caps
    RLIMIT_MEMLOCK with prlimit first."""
    need(shutil.which("setpriv"), "setpriv missing (util-linux)")
    pre = []
    if memlock is not None:
        need(shutil.which("prlimit"), "prlimit missing (util-linux)")
        pre = ["prlimit", f"--memlock={memlock}:{memlock}", "--"]
    return pre + ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                  "--inh-caps=-all", "--bounding-set=-all", "--"] + list(argv)


# --- pincached with the options these tests need ---------------------------------------

class HygieneDaemon(Daemon):
    """pincached on a test bus: --verbose (so "the PIN in no log" covers the debug
    log too), optionally as another user and with RLIMIT_MEMLOCK capped."""

    def __init__(self, binary, bus, config_path, env, stderr_path, user=None, memlock=None,
                 extra_args=()):
        self.bus = bus
        self.config_path = config_path
        self.stderr_path = stderr_path
        argv = [str(binary), "--bus", bus.address, "--config", str(config_path), "--verbose", *extra_args]
        if user is not None or memlock is not None:
            uid, gid = user if user is not None else (0, 0)
            argv = as_user_argv(argv, uid, gid, memlock)
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=open(stderr_path.with_suffix(".stdout"), "wb"),
            stderr=open(stderr_path, "wb"), env=env)

    @property
    def pid(self):
        """The daemon's own pid (setpriv and prlimit exec, so it is the child's)."""
        return self.proc.pid


def world_readable_tmp(prefix):
    """A directory under /tmp that an unprivileged daemon can read (pytest's are 0700)."""
    import tempfile
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.chmod(0o755)
    return d


class PublicBus(Bus):
    """The integration suite's test bus, open to every uid (dbus-daemon admits only its
    own uid unless told otherwise)."""

    def __init__(self, tmp):
        saved = itc.BUS_CONFIG
        itc.BUS_CONFIG = saved.replace('<policy context="default">',
                                       '<policy context="default">\n    <allow user="*"/>')
        try:
            super().__init__(tmp)
        finally:
            itc.BUS_CONFIG = saved


@pytest.fixture
def bus():
    """A private dbus-daemon like the integration suite's, but its socket in a directory
    that unprivileged daemons and clients can reach (pytest's tmp dirs are 0700)."""
    need(shutil.which("dbus-daemon"), "dbus-daemon not installed")
    d = world_readable_tmp("pincache-bus-")
    b = PublicBus(d)
    yield b
    b.stop()
    shutil.rmtree(d, ignore_errors=True)


# --- tokens with a secret PIN and a daemon over them -------------------------------------

@pytest.fixture(scope="module")
def secret_store(tmp_path_factory):
    """SoftHSM demo tokens whose user PIN is a fresh random 40-character string."""
    pin, so_pin = random_pin(), random_pin(24)
    d = tmp_path_factory.mktemp("hygiene-tokens")
    make_token_store(d, pin, so_pin)
    return d, pin, so_pin


@pytest.fixture
def start(pincached_bin, bus, tmp_path, secret_store):
    """start(caching=True, module=SoftHSM, env={}, user=None, memlock=None, workdir=tmp_path)
    -> a ready HygieneDaemon over a private copy of the secret tokens."""
    need(os.geteuid() == 0, "these tests run pincached as root or nobody and read its memory: run as root")
    need(pincached_bin.exists(), f"{pincached_bin} not built")
    daemons = []

    def run(caching=True, module=SOFTHSM_MODULE, env=None, user=None, memlock=None, workdir=None,
            extra=()):
        work = workdir or tmp_path
        n = len(daemons)
        tokens = Tokens(secret_store[0], work / f"softhsm-{n}")
        cfg = work / f"pincache-{n}.cfg"
        cfg.write_text(config_text(caching=caching, modules=[module], extra=extra))
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("DBUS_")}
        full_env.update(tokens.env())
        full_env.update(env or {})
        if user is not None:
            chown_tree(work, *user)
        d = HygieneDaemon(pincached_bin, bus, cfg, full_env, work / f"pincached-{n}.stderr",
                          user=user, memlock=memlock)
        daemons.append(d)
        d.wait_ready()
        return d

    yield run
    for d in daemons:
        d.stop()
