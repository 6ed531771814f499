"""Issue 6 item 10: configuration trust. On the system bus, a configuration file, a
directory above it, or a Module= path that a non-root user could change (or that root
does not own) makes pincached exit 2 naming the file, before it touches any bus. On a
private bus the check is off, and the log says so.

"Before any bus": DBUS_SYSTEM_BUS_ADDRESS points at a listening socket of the test's;
a refused start must leave it untouched, while a trusted configuration connects to it
(which shows the probe can see a connection)."""

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from hygiene_support import (  # noqa: F401 (fixtures)
    SOFTHSM_MODULE, bus, build_dir, figure, need, pincached_bin, unprivileged_user, world_readable_tmp)

ITEM = 10


class FakeSystemBus:
    """A unix socket standing in for the system bus: counts the connections it gets."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.accepted = 0
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            conn.close()

    def close(self):
        self.stop = True
        self.thread.join(2)
        self.sock.close()

    @property
    def address(self):
        return f"unix:path={self.path}"


@pytest.fixture
def area():
    """A root-owned 0755 directory under /tmp (sticky, root's) for configs and modules."""
    d = world_readable_tmp("pincache-trust-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def system_bus(area):
    fake = FakeSystemBus(area / "system_bus_socket")
    yield fake
    fake.close()


@pytest.fixture
def run_system(pincached_bin, system_bus):
    """run_system(config) -> (exit code or None if still running after timeout, stderr)."""
    need(os.geteuid() == 0, "configuration trust needs root (chown)")
    need(pincached_bin.exists(), f"{pincached_bin} not built")

    def run(config, timeout=10):
        env = {k: v for k, v in os.environ.items() if not k.startswith("DBUS_")}
        env["DBUS_SYSTEM_BUS_ADDRESS"] = system_bus.address
        p = subprocess.Popen([str(pincached_bin), "--bus", "system", "--config", str(config)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=env, text=True)
        try:
            _, err = p.communicate(timeout=timeout)
            return p.returncode, err
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            return None, err

    return run


def write(path, text, mode=0o644, owner=(0, 0)):
    path.write_text(text)
    os.chown(path, *owner)
    path.chmod(mode)
    return path


def module_copy(dirpath, mode=0o644, owner=(0, 0)):
    need(os.path.exists(SOFTHSM_MODULE), "softhsm2 not installed")
    dirpath.mkdir(exist_ok=True)
    dst = dirpath / "libsofthsm2-copy.so"
    shutil.copy(SOFTHSM_MODULE, dst)
    os.chown(dst, *owner)
    dst.chmod(mode)
    return dst


def cases(area):
    """(name, config path, the path the message must name) for every untrusted setup."""
    _, uid, gid = unprivileged_user()
    body = f"P11_EnableCachePIN=1\nModule={SOFTHSM_MODULE}\n"
    out = []

    out.append(("config owned by a user", write(area / "user-owned.cfg", body, owner=(uid, gid)), None))
    out.append(("config group-writable", write(area / "group-writable.cfg", body, mode=0o664), None))
    out.append(("config world-writable", write(area / "world-writable.cfg", body, mode=0o666), None))

    d = area / "user-dir"
    d.mkdir()
    os.chown(d, uid, gid)
    out.append(("config in a user's directory", write(d / "p.cfg", body), str(d)))

    d = area / "open-dir"
    d.mkdir()
    d.chmod(0o777)
    out.append(("config in a world-writable directory", write(d / "p.cfg", body), str(d)))

    d = area / "link-dir"
    d.mkdir()
    os.chown(d, uid, gid)
    target = write(area / "target.cfg", body)
    link = d / "p.cfg"
    link.symlink_to(target)
    out.append(("config through a symlink in a user's directory", link, str(d)))

    mods = area / "mods-writable"
    m = module_copy(mods, mode=0o666)
    out.append(("Module= world-writable", write(area / "mod-writable.cfg", f"Module={m}\n"), str(m)))

    mods = area / "mods-user"
    m = module_copy(mods, owner=(uid, gid))
    out.append(("Module= owned by a user", write(area / "mod-user.cfg", f"Module={m}\n"), str(m)))

    mods = area / "mods-userdir"
    m = module_copy(mods)
    os.chown(mods, uid, gid)
    out.append(("Module= in a user's directory", write(area / "mod-userdir.cfg", f"Module={m}\n"), str(m)))
    return out


def test_untrusted_files_stop_the_system_daemon(area, run_system, system_bus):
    refused = 0
    for name, config, culprit in cases(area):
        t0 = time.monotonic()
        code, err = run_system(config)
        elapsed = time.monotonic() - t0
        assert code == 2, f"{name}: exit {code}, want 2\n{err}"
        named = culprit or str(config)
        assert named in err, f"{name}: the message does not name {named}:\n{err}"
        assert "not trusted" in err, f"{name}: {err}"
        assert len(err.strip().splitlines()) == 1, f"{name}: want one line, got:\n{err}"
        refused += 1
        print(f"  {name}: exit 2 in {elapsed:.2f}s: {err.strip()}")
    assert system_bus.accepted == 0, f"a refused daemon connected to the system bus {system_bus.accepted} time(s)"
    figure(ITEM, "untrusted setups refused with exit 2, naming the file, before any bus", refused)
    figure(ITEM, "connections to the system bus by refused daemons", system_bus.accepted, limit=0)


def test_trusted_configuration_goes_on_to_the_bus(area, run_system, system_bus):
    """The control: root's files pass the check, and the probe sees the connection."""
    mods = area / "mods-good"
    m = module_copy(mods)
    config = write(area / "good.cfg", f"P11_EnableCachePIN=1\nModule={m}\nModule={SOFTHSM_MODULE}\n")
    code, err = run_system(config, timeout=3)
    assert "not trusted" not in err, err
    assert code != 2, f"a trusted configuration was refused:\n{err}"
    assert system_bus.accepted >= 1, f"the daemon never reached the (fake) system bus:\n{err}"
    figure(ITEM, "trusted configuration: connections to the system bus", system_bus.accepted)


def test_private_bus_does_not_check_and_says_so(area, pincached_bin, bus):
    need(pincached_bin.exists(), f"{pincached_bin} not built")
    _, uid, gid = unprivileged_user()
    config = write(area / "private.cfg", f"P11_EnableCachePIN=1\nModule={SOFTHSM_MODULE}\n", mode=0o666,
                   owner=(uid, gid))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBUS_")}
    err_path = area / "private.stderr"
    p = subprocess.Popen([str(pincached_bin), "--bus", bus.address, "--config", str(config)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(err_path, "wb"), env=env)
    try:
        deadline = time.monotonic() + 20
        while not bus.name_has_owner() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bus.name_has_owner(), "pincached did not start on the private bus:\n" + err_path.read_text()
    finally:
        p.terminate()
        p.wait(10)
    log = err_path.read_text()
    notes = [l for l in log.splitlines() if "not checked" in l]
    assert len(notes) == 1, log
    figure(ITEM, "private bus: untrusted configuration accepted, notice lines", len(notes), note=notes[0])
