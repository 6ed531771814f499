"""Fixtures for the pincached integration tests: everything is real and private to
one test (a dbus-daemon on a unix socket in the test's temp dir, a copy of two
SoftHSM tokens, a config file, pincached itself, and the fault shim when asked).

Environment:
  PINCACHE_BUILD_DIR  where pincached and libpincache-faultshim.so are
                      (default <repo>/.build/debug)
  CI=true             anything missing fails the test instead of skipping it
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dbus
import dbus.bus
import pytest

from pincache_client import BUS_NAME, PIN, SO_PIN, Client, load_cert

REPO = Path(__file__).resolve().parents[2]
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
READY_TIMEOUT = 20.0
LABELS = ("pincache-demo", "pincache-second")


def need(condition, why):
    """Skips the test when condition is false; under CI=true fails it instead."""
    if not condition:
        if CI:
            pytest.fail(f"missing requirement (CI=true): {why}")
        pytest.skip(why)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    # Skips are failures under CI: a green CI run must mean every test ran.
    if CI and rep.skipped and not hasattr(rep, "wasxfail"):
        rep.outcome = "failed"
        rep.longrepr = f"skipped under CI=true: {call.excinfo.value if call.excinfo else ''}"
    if rep.failed:
        for d in getattr(item, "_pincache_daemons", []):
            rep.sections.append((f"pincached stderr ({d.config_path.name})", d.stderr_text()))


# --- build products -----------------------------------------------------------

@pytest.fixture(scope="session")
def build_dir():
    return Path(os.environ.get("PINCACHE_BUILD_DIR", REPO / ".build" / "debug"))


@pytest.fixture(scope="session")
def pincached_bin(build_dir):
    return build_dir / "pincached"


@pytest.fixture(scope="session")
def faultshim_lib(build_dir):
    return build_dir / "libpincache-faultshim.so"


@pytest.fixture(scope="session")
def repo():
    return REPO


# --- private dbus-daemon ------------------------------------------------------

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>pincache-test</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
  <!-- The 16 MiB payload test must reach the daemon, not die in the bus. -->
  <limit name="max_message_size">67108864</limit>
  <limit name="max_incoming_bytes">268435456</limit>
  <limit name="reply_timeout">60000</limit>
</busconfig>
"""


class Bus:
    def __init__(self, tmp):
        self.dir = tmp
        self.socket = tmp / "bus.sock"
        self.config = tmp / "bus.conf"
        self.config.write_text(BUS_CONFIG.format(socket=self.socket))
        self.proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={self.config}", "--nofork", "--nopidfile",
             "--print-address=1"],
            stdout=subprocess.PIPE, stderr=open(tmp / "bus.stderr", "wb"), text=True)
        line = self.proc.stdout.readline().strip()
        if not line:
            raise RuntimeError("dbus-daemon exited: " + (tmp / "bus.stderr").read_text())
        self.address = line
        self._watch = None

    def name_has_owner(self, name=BUS_NAME):
        if self._watch is None:
            self._watch = dbus.bus.BusConnection(self.address)
        return bool(self._watch.name_has_owner(name))

    def stop(self):
        if self._watch is not None:
            self._watch.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def bus(tmp_path):
    need(shutil.which("dbus-daemon"), "dbus-daemon not installed")
    d = tmp_path / "bus"
    d.mkdir()
    b = Bus(d)
    yield b
    b.stop()


# --- SoftHSM tokens -----------------------------------------------------------

@pytest.fixture(scope="session")
def token_template(tmp_path_factory):
    """Two demo tokens made once per run; each test gets its own copy."""
    need(shutil.which("softhsm2-util") and os.path.exists(SOFTHSM_MODULE), "softhsm2 not installed")
    need(shutil.which("pkcs11-tool"), "opensc (pkcs11-tool) not installed")
    need(shutil.which("openssl"), "openssl not installed")
    d = tmp_path_factory.mktemp("token-template")
    env = {**os.environ, "PINCACHE_DEMO_PIN": PIN, "PINCACHE_DEMO_SO_PIN": SO_PIN}
    for label in LABELS:
        subprocess.run([str(REPO / "scripts" / "make-demo-token.sh"), str(d), label], check=True,
                       stdout=subprocess.DEVNULL, env=env)
    return d


class Tokens:
    """A private copy of the token store: SOFTHSM2_CONF plus the certificates."""

    def __init__(self, template, dest):
        shutil.copytree(template, dest)
        self.dir = dest
        self.conf = dest / "softhsm2.conf"
        self.conf.write_text(self.conf.read_text().replace(str(template), str(dest)))

    def cert_path(self, kind, label="pincache-demo"):
        return self.dir / label / f"{kind}-cert.der"

    def cert(self, kind, label="pincache-demo"):
        return load_cert(self.cert_path(kind, label))

    def env(self):
        return {"SOFTHSM2_CONF": str(self.conf)}


@pytest.fixture
def tokens(token_template, tmp_path):
    return Tokens(token_template, tmp_path / "softhsm")


# --- fault shim ---------------------------------------------------------------

class FaultShim:
    """The control directory of libpincache-faultshim.so (files read on each call)."""

    def __init__(self, lib, control):
        self.lib = lib
        self.dir = control
        control.mkdir()

    def _write(self, name, text):
        tmp = self.dir / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.dir / name)  # atomic: the shim never sees half a file

    def reject_pin(self, pin):
        self._write("reject_pin", pin)

    def token_flags_add(self, flags):
        self._write("token_flags_add", hex(flags))

    def token_flags_clear(self):
        """The token's flags are SoftHSM's own again (a login succeeded elsewhere)."""
        (self.dir / "token_flags_add").unlink(missing_ok=True)

    def token_info_fail(self, rv, count=None):
        """The next `count` C_GetTokenInfo calls (all, if None) fail with `rv`."""
        self._write("token_info_fail", f"{rv:#x}" + ("" if count is None else f" {count}"))

    def token_info_ok(self):
        (self.dir / "token_info_fail").unlink(missing_ok=True)

    def delay_ms(self, ms):
        self._write("delay_ms", str(ms))

    def optional_functions(self):
        """The shim implements what SoftHSM leaves out (optional.c): recovery, the dual
        functions, operation state, and operations of different kinds at once."""
        self._write("optional_functions", "")

    def stale_session_once(self):
        self._write("stale_session_once", "")

    def logins(self):
        """[(userType, rv)] for every C_Login the shim saw, oldest first."""
        log = self.dir / "logins.log"
        if not log.exists():
            return []
        out = []
        for line in log.read_text().splitlines():
            user_type, rv = line.split()
            out.append((int(user_type, 0), int(rv, 16)))
        return out

    def logouts(self):
        """[rv] for every C_Logout the shim saw, oldest first."""
        log = self.dir / "logouts.log"
        return [int(line, 16) for line in log.read_text().splitlines()] if log.exists() else []

    def env(self):
        return {"PINCACHE_FAULTSHIM_DIR": str(self.dir),
                "PINCACHE_FAULTSHIM_TARGET": SOFTHSM_MODULE}


@pytest.fixture
def faultshim(faultshim_lib, tmp_path):
    need(faultshim_lib.exists(), f"{faultshim_lib} not built (swift build)")
    return FaultShim(faultshim_lib, tmp_path / "faultshim")


# --- pincached ----------------------------------------------------------------

def config_text(caching=True, logout_after_sign=None, force_login=None, modules=(),
                extra=(), apps=None):
    lines = ["# written by Tests/integration/conftest.py"]
    if caching is not None:
        lines.append(f"P11_EnableCachePIN={1 if caching else 0}")
    if logout_after_sign is not None:
        lines.append(f"P11_LogoutAfterSign={1 if logout_after_sign else 0}")
    if force_login is not None:
        lines.append(f"ForceLoginBeforeSignKeyUsage={force_login:#x}")
    lines += [f"Module={m}" for m in modules]
    lines += list(extra)
    for exe, keys in (apps or {}).items():
        lines.append(f"[app {exe}]")
        lines += list(keys)
    return "\n".join(lines) + "\n"


class Daemon:
    def __init__(self, binary, bus, config_path, env, stderr_path, args=()):
        self.bus = bus
        self.config_path = config_path
        self.stderr_path = stderr_path
        self.proc = subprocess.Popen(
            [str(binary), "--bus", bus.address, "--config", str(config_path), *args],
            stdin=subprocess.DEVNULL, stdout=open(stderr_path.with_suffix(".stdout"), "wb"),
            stderr=open(stderr_path, "wb"), env=env)

    def stderr_text(self):
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no stderr file)"

    def wait_ready(self, timeout=READY_TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"pincached exited with {self.proc.returncode} before owning {BUS_NAME}:\n"
                            + self.stderr_text())
            if self.bus.name_has_owner():
                return
            time.sleep(0.05)
        pytest.fail(f"pincached did not own {BUS_NAME} within {timeout}s:\n" + self.stderr_text())

    def stop(self, timeout=10):
        """SIGTERM; returns the exit code (SIGKILL and None if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode


@pytest.fixture
def daemon_env(tokens):
    """Environment for pincached: ours minus anything that could point it at a
    real bus or real tokens."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DBUS_SESSION_BUS_ADDRESS", "DBUS_SYSTEM_BUS_ADDRESS")}
    env.update(tokens.env())
    return env


@pytest.fixture
def start_daemon(request, pincached_bin, bus, tokens, daemon_env, tmp_path):
    """start_daemon(caching=True, logout_after_sign=None, force_login=None,
    module="softhsm"|"shim"|PATH, extra=[lines], apps={exe: [lines]}, text=None, args=[],
    env_extra={}) -> a ready Daemon. `text` replaces the generated config entirely; `args`
    are extra command-line arguments, `env_extra` extra environment."""
    need(pincached_bin.exists(), f"{pincached_bin} not built (swift build)")
    daemons = []
    request.node._pincache_daemons = daemons

    def start(module="softhsm", text=None, shim=None, args=(), env_extra=None, **kw):
        if module == "softhsm":
            modules = [SOFTHSM_MODULE]
        elif module == "shim":
            assert shim is not None, "module='shim' needs shim=faultshim"
            modules = [str(shim.lib)]
        else:
            modules = [module]
        n = len(daemons)
        cfg = tmp_path / f"pincache-{n}.cfg"
        cfg.write_text(text if text is not None else config_text(modules=modules, **kw))
        env = dict(daemon_env)
        if shim is not None:
            env.update(shim.env())
        env.update(env_extra or {})
        d = Daemon(pincached_bin, bus, cfg, env, tmp_path / f"pincached-{n}.stderr", args)
        daemons.append(d)
        d.wait_ready()
        return d

    yield start
    for d in daemons:
        d.stop()


@pytest.fixture
def run_daemon(pincached_bin, bus, daemon_env, tmp_path):
    """run_daemon(config_text, timeout) -> CompletedProcess, for configs that must
    make pincached exit (stderr captured as text)."""
    need(pincached_bin.exists(), f"{pincached_bin} not built (swift build)")

    def run(text, timeout=20):
        cfg = tmp_path / "bad.cfg"
        cfg.write_text(text)
        return cfg, subprocess.run(
            [str(pincached_bin), "--bus", bus.address, "--config", str(cfg)],
            env=daemon_env, capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture
def make_client(bus):
    """make_client(name) -> a new Client (its own bus connection); all closed at teardown."""
    clients = []

    def make(name="client"):
        c = Client(bus.address, name)
        clients.append(c)
        return c

    yield make
    for c in clients:
        try:
            c.close()
        except Exception:
            pass


@pytest.fixture
def busctl(bus):
    """busctl(*args) against the test bus -> CompletedProcess (text)."""
    need(shutil.which("busctl"), "busctl not installed")

    def run(*args, check=False):
        return subprocess.run(["busctl", f"--address={bus.address}", *args],
                              capture_output=True, text=True, timeout=60, check=check)

    return run


@pytest.fixture
def gdbus(bus):
    need(shutil.which("gdbus"), "gdbus not installed")

    def run(*args):
        return subprocess.run(["gdbus", "call", "--address", bus.address, "--dest", BUS_NAME, *args],
                              capture_output=True, text=True, timeout=60)

    return run


@pytest.fixture
def python_exe():
    """The executable the kernel reports for this test process (/proc/self/exe)."""
    return os.path.realpath("/proc/self/exe") if os.path.exists("/proc/self/exe") else \
        os.path.realpath(sys.executable)
