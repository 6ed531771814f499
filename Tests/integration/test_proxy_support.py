"""Shared pieces of the proxy tests (no tests here): the proxy library, the C host
program compiled from test_proxy_host.c, a driver for its `repl` mode, and the `host`
fixture that starts initialised ones."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import need

TESTS = Path(__file__).resolve().parent
LABEL = "pincache-demo"


@pytest.fixture(scope="session")
def proxy_lib(build_dir):
    lib = build_dir / "libpincache-pkcs11.so"
    need(lib.exists(), f"{lib} not built (swift build --product pincache-pkcs11)")
    return lib


@pytest.fixture(scope="session")
def proxy_host(tmp_path_factory):
    """test_proxy_host.c compiled with cc: a plain C application loading PKCS#11 modules."""
    need(shutil.which("cc"), "no C compiler (cc)")
    cflags = subprocess.run(["pkg-config", "--cflags", "p11-kit-1"], capture_output=True, text=True)
    need(cflags.returncode == 0, "p11-kit-1 development files missing (libp11-kit-dev)")
    exe = tmp_path_factory.mktemp("proxy-host") / "proxy_host"
    subprocess.run(["cc", "-Wall", "-Werror", "-O1", "-o", str(exe), str(TESTS / "test_proxy_host.c"),
                    *cflags.stdout.split(), "-ldl", "-lpthread"], check=True)
    return exe


class Host:
    """One `proxy_host MODULE repl LABEL` process: h("command") -> (rv name, rest of line)."""

    def __init__(self, exe, module, label, env):
        self.proc = subprocess.Popen([str(exe), str(module), "repl", label], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **env})

    def __call__(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"host died on '{command}': {self.proc.stderr.read()}"
        parts = line.split(maxsplit=2)
        assert len(parts) >= 2, line
        return parts[1], (parts[2].strip() if len(parts) > 2 else "")

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def host(proxy_host, proxy_lib, bus):
    """host() -> a Host running `repl` on the demo token through the proxy, initialised."""
    hosts = []

    def make():
        h = Host(proxy_host, proxy_lib, LABEL, {"PINCACHE_BUS_ADDRESS": bus.address})
        hosts.append(h)
        assert h("init")[0] == "CKR_OK"
        return h

    yield make
    for h in hosts:
        h.close()
