"""Fixtures for the system tests: the Debian package built from this repository and
installed on this machine, the real system bus (dbus-daemon --system), the real polkitd,
two unprivileged users and a SoftHSM token in the system token store.

Runs as root only (it installs a package, adds users and a polkit rule); skips otherwise,
and fails instead of skipping under CI=true. Everything it adds is removed afterwards;
daemons it started are stopped (a bus or polkitd that was already running is left alone).

Environment:
  PINCACHE_DEB             use this .deb instead of running `make deb`
  PINCACHE_SCRATCH         SwiftPM scratch path for `make deb` (as for the Makefile)
  PINCACHE_KEEP_INSTALLED  1 = leave the package installed afterwards
  CI=true                  anything missing fails instead of skipping
"""

import glob
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BUS_SOCKET = "/run/dbus/system_bus_socket"
POLKITD = "/usr/lib/polkit-1/polkitd"
TOKEN_STORE = Path("/var/lib/softhsm/tokens")
RULES_FILE = Path("/etc/polkit-1/rules.d/10-pincache-systest.rules")
LABEL = "pincache-systest"
PIN = "123456"
U1, U2, U3 = "pctest1", "pctest2", "pctest3"
DAEMON_USER = "pincache"
RUN_DIR = "/run/pincache"

# Allows U1 everything but org.pincache.manage (so FlushCaches from U1 is refused: it falls
# through to auth_admin_keep, and no agent can answer), denies U2 everything, and lets U3 log
# in but never use its cached PIN (the one authorisation step, on both front ends).
TEST_RULES = """
polkit.addRule(function(action, subject) {
    if (action.id.indexOf("org.pincache.") != 0) return undefined;
    if (subject.user == "%s" && action.id != "org.pincache.manage") return polkit.Result.YES;
    if (subject.user == "%s") return polkit.Result.NO;
    if (subject.user == "%s") return action.id == "org.pincache.login" ? polkit.Result.YES : polkit.Result.NO;
    return undefined;
});
// An administrator for org.pincache.manage whose password nobody knows (U3's account is
// locked): pincachectl's text agent must ask for it, and a wrong one is refused.
polkit.addAdminRule(function(action, subject) {
    if (action.id == "org.pincache.manage") return ["unix-user:%s"];
    return undefined;
});
""" % (U1, U2, U3, U3)


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
    # A green CI run must mean every test ran.
    if CI and rep.skipped and not hasattr(rep, "wasxfail"):
        rep.outcome = "failed"
        rep.longrepr = f"skipped under CI=true: {call.excinfo.value if call.excinfo else ''}"


def run(cmd, check=True, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    r = subprocess.run(cmd, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


def bus_answers():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(BUS_SOCKET)
        return True
    except OSError:
        return False
    finally:
        s.close()


def name_has_owner(name):
    r = run(["busctl", "--system", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
             "org.freedesktop.DBus", "NameHasOwner", "s", name], check=False)
    return r.returncode == 0 and r.stdout.strip() == "b true"


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def daemon_pids():
    """pincached processes of the daemon user: only ever ones these tests caused (activation)."""
    try:
        pwd.getpwnam(DAEMON_USER)
    except KeyError:
        return []
    r = run(["pgrep", "-u", DAEMON_USER, "-x", "pincached"], check=False)
    return [int(p) for p in r.stdout.split()]


def stop_daemon():
    pids = daemon_pids()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    wait_for(lambda: not daemon_pids() and not (bus_answers() and name_has_owner("org.pincache.Daemon")), 10,
             "pincached to stop")


def client_env():
    """The environment for programs run as test users: the real system bus, nothing private."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PINCACHE_BUS_ADDRESS", "DBUS_SYSTEM_BUS_ADDRESS", "DBUS_SESSION_BUS_ADDRESS")}
    env["LC_ALL"] = "C.UTF-8"
    return env


class SysClient:
    """sysclient.py running as a user: one bus connection, so one cache environment."""

    def __init__(self, system, user):
        self.user = user
        self.proc = subprocess.Popen(
            ["runuser", "-u", user, "--", "/usr/bin/python3", str(system.workdir / "sysclient.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=client_env(), cwd=str(system.workdir))
        system.clients.append(self)

    def send(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"sysclient as {self.user} died: {self.proc.stderr.read()}")
        return json.loads(line)

    def call(self, path, iface, member, sig="", *args):
        return self.send(op="call", path=path, iface=iface, member=member, sig=sig, args=list(args))

    def ok(self, path, iface, member, sig="", *args):
        answer = self.call(path, iface, member, sig, *args)
        assert "ok" in answer, f"{member} as {self.user}: {answer}"
        return answer["ok"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class System:
    def __init__(self, workdir, certdir):
        self.workdir = workdir
        self.certdir = certdir
        self.clients = []

    def client(self, user):
        return SysClient(self, user)

    def run_as(self, user, *cmd, input=None, check=False, text=True):
        return run(["runuser", "-u", user, "--", *cmd], check=check, input=input, text=text,
                   env=client_env(), cwd=str(self.workdir))

    def cert(self, key):
        return (self.certdir / f"{key}-cert.der").read_bytes()


def remove_token_dirs(label):
    """Token directories in the system store whose token carries `label` (ours only)."""
    for tok in TOKEN_STORE.glob("*/token.object"):
        if label.encode() in tok.read_bytes():
            shutil.rmtree(tok.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def system():
    need(os.geteuid() == 0, "system tests run as root (they install a package and add users)")
    for tool in ("dbus-daemon", "busctl", "runuser", "useradd", "userdel", "softhsm2-util", "pkcs11-tool",
                 "openssl", "dpkg-deb", "apt-get", "pkaction", "systemd-analyze", "pgrep"):
        need(shutil.which(tool), f"{tool} is not installed")
    need(os.path.exists(POLKITD), f"{POLKITD} is missing (Debian package polkitd)")
    need(os.path.exists("/usr/lib/softhsm/libsofthsm2.so"), "softhsm2 is not installed")

    cleanups = []
    workdir = Path(tempfile.mkdtemp(prefix="pincache-systest-"))
    os.chmod(workdir, 0o755)
    cleanups.append(lambda: shutil.rmtree(workdir, ignore_errors=True))
    try:
        # 1. The package, built from this repository.
        deb = os.environ.get("PINCACHE_DEB")
        if not deb:
            r = run(["make", "deb"], check=False, cwd=str(REPO))
            assert r.returncode == 0, f"make deb failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
            debs = sorted(glob.glob(str(REPO / "build" / "pincache_*.deb")), key=os.path.getmtime)
            assert debs, "make deb produced no build/pincache_*.deb"
            deb = debs[-1]
        stop_daemon_if_bus = bus_answers()
        if stop_daemon_if_bus:
            stop_daemon()
        run(["apt-get", "install", "-y", "--no-install-recommends", "--allow-downgrades", os.path.abspath(deb)],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if os.environ.get("PINCACHE_KEEP_INSTALLED") != "1":
            cleanups.append(lambda: run(["apt-get", "purge", "-y", "pincache"], check=False,
                                        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}))

        # 2. The system bus.
        if not bus_answers():
            os.makedirs("/run/dbus", exist_ok=True)
            if os.path.exists("/run/dbus/pid"):
                os.unlink("/run/dbus/pid")  # stale: nothing answers on the socket
            r = run(["dbus-daemon", "--system", "--fork", "--print-pid"])
            bus_pid = int(r.stdout.split()[0])

            def stop_bus():
                try:
                    os.kill(bus_pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                for f in ("/run/dbus/pid", BUS_SOCKET):
                    try:
                        os.unlink(f)
                    except FileNotFoundError:
                        pass
            cleanups.append(stop_bus)
            wait_for(bus_answers, 10, "the system bus")
        else:
            # Our policy file is new: make sure a running bus has read it.
            run(["busctl", "--system", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                 "org.freedesktop.DBus", "ReloadConfig"])

        # First thing at teardown: the daemon the tests activated goes, before anything it uses.
        cleanups.append(stop_daemon)

        # 3. The test polkit rule, then polkitd (which reads rules at start and on change).
        RULES_FILE.parent.mkdir(parents=True, exist_ok=True)
        RULES_FILE.write_text(TEST_RULES)
        os.chmod(RULES_FILE, 0o644)
        cleanups.append(lambda: RULES_FILE.unlink(missing_ok=True))
        if not name_has_owner("org.freedesktop.PolicyKit1"):
            log = open(workdir / "polkitd.log", "w")
            polkitd = subprocess.Popen([POLKITD, "--no-debug"], stdout=log, stderr=subprocess.STDOUT)

            def stop_polkitd():
                polkitd.terminate()
                try:
                    polkitd.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    polkitd.kill()
                    polkitd.wait()
                log.close()
            cleanups.append(stop_polkitd)
            wait_for(lambda: name_has_owner("org.freedesktop.PolicyKit1"), 15, "polkitd on the bus")
        else:
            time.sleep(2)  # a running polkitd notices the new rule through inotify

        # 4. Three unprivileged users.
        for user in (U1, U2, U3):
            try:
                pwd.getpwnam(user)
            except KeyError:
                run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", user])
                cleanups.append(lambda user=user: run(["userdel", user], check=False))

        # 5. A SoftHSM token in the system store, readable by group softhsm (pincache's).
        remove_token_dirs(LABEL)
        scratch = workdir / "hsm"
        run([str(REPO / "scripts" / "make-demo-token.sh"), str(scratch), LABEL])
        gid = grp.getgrnam("softhsm").gr_gid
        for tokdir in (scratch / "tokens").iterdir():
            dest = TOKEN_STORE / tokdir.name
            shutil.copytree(tokdir, dest)
            cleanups.append(lambda dest=dest: shutil.rmtree(dest, ignore_errors=True))
            for path in [dest, *dest.rglob("*")]:
                os.chown(path, 0, gid)
                os.chmod(path, 0o2770 if path.is_dir() else 0o660)
        certdir = scratch / LABEL
        for f in certdir.iterdir():
            os.chmod(f, 0o644)
        shutil.copy(Path(__file__).with_name("sysclient.py"), workdir / "sysclient.py")
        shutil.copy(Path(__file__).with_name("flood.py"), workdir / "flood.py")
        os.chmod(workdir / "sysclient.py", 0o755)
        # SoftHSM reads its token store when the daemon starts: no daemon from before the token.
        stop_daemon()

        system = System(workdir, certdir)
        system.deb = os.path.abspath(deb)
        yield system
        for c in system.clients:
            c.close()
    finally:
        for cleanup in reversed(cleanups):
            try:
                cleanup()
            except Exception as e:  # keep cleaning up
                print(f"system test cleanup: {e}")
