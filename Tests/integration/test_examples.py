"""The client examples in docs/examples run as documented against a daemon (issue 16 §6)."""

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import need
from pincache_client import EC_KEY, PIN, verify, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support" / "vcard"))
from fixtures import OPENSC_CONF, OPENSC_PKCS11, pcscd, vcard_factory  # noqa: E402,F401  (fixtures)

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def test_python_example_keeps_one_login_for_two_signatures(start_daemon, bus, tokens):
    start_daemon(caching=True)
    r = subprocess.run(["/usr/bin/python3", str(EXAMPLES / "cached_pin_session.py"), "pincache-demo", EC_KEY.hex()],
                       input=PIN + "\n", capture_output=True, text=True, timeout=60,
                       env={"PINCACHE_BUS_ADDRESS": bus.address, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for message, line in zip((b"first message", b"second message"), lines[:2]):
        verify(tokens.cert("ec"), "ECDSA", message, bytes.fromhex(line))
    assert lines[2].startswith("cached on: /org/pincache/token/"), lines


def test_busctl_example_signs_once(start_daemon, bus, tokens, tmp_path):
    need(Path("/usr/bin/busctl").exists(), "busctl is not installed (systemd)")
    start_daemon(caching=True)
    data = tmp_path / "data.bin"
    data.write_bytes(b"signed from a shell")
    r = subprocess.run(["bash", str(EXAMPLES / "busctl.sh"), "pincache-demo", EC_KEY.hex(), str(data)],
                       input=PIN + "\n", capture_output=True, text=True, timeout=60,
                       env={"PINCACHE_BUS_ADDRESS": bus.address, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    verify(tokens.cert("ec"), "ECDSA-SHA256", b"signed from a shell", bytes.fromhex(r.stdout.strip()))


@pytest.fixture(scope="module")
def gdbus_client(tmp_path_factory):
    """docs/examples/gdbus_client.c, built as its comment says (warnings are errors here)."""
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "gio-2.0"], capture_output=True, text=True)
    need(flags.returncode == 0, "gio-2.0 development files missing (libglib2.0-dev)")
    binary = tmp_path_factory.mktemp("gdbus") / "gdbus_client"
    r = subprocess.run(["cc", "-Wall", "-Wextra", "-Werror", str(EXAMPLES / "gdbus_client.c"), *flags.stdout.split(),
                        "-o", str(binary)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return binary


def test_gdbus_example_keeps_one_login_for_two_signatures(start_daemon, bus, tokens, gdbus_client):
    start_daemon(caching=True)
    r = subprocess.run([str(gdbus_client), "sign", "pincache-demo", EC_KEY.hex()], input=PIN + "\n",
                       capture_output=True, text=True, timeout=60, env={"PINCACHE_BUS_ADDRESS": bus.address})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3, lines
    for message, line in zip((b"first message", b"second message"), lines):
        verify(tokens.cert("ec"), "ECDSA-SHA256", message, bytes.fromhex(line))
    # Its Logout came back as CacheCleared, to this connection.
    assert lines[2].startswith("CacheCleared /org/pincache/token/") and lines[2].endswith(" logout"), lines


def test_gdbus_example_reports_a_wrong_pin_by_its_error_name(start_daemon, bus, gdbus_client):
    start_daemon(caching=True)
    r = subprocess.run([str(gdbus_client), "sign", "pincache-demo", EC_KEY.hex()], input="000000\n",
                       capture_output=True, text=True, timeout=60, env={"PINCACHE_BUS_ADDRESS": bus.address})
    assert r.returncode == 1 and "org.pincache.Error.PinIncorrect" in r.stderr, r.stderr


def test_gdbus_example_sees_a_card_come_and_go(start_daemon, daemon_env, pcscd, vcard_factory, bus, gdbus_client):
    """The `watch` half on the virtual card: TokenInserted, Present changes, TokenRemoved."""
    daemon_env["OPENSC_CONF"] = str(OPENSC_CONF)
    start_daemon(module=OPENSC_PKCS11, caching=True, extra=["SlotPollInterval=300"])
    watcher = subprocess.Popen([str(gdbus_client), "watch", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={"PINCACHE_BUS_ADDRESS": bus.address})
    lines = []
    threading.Thread(target=lambda: [lines.append(l) for l in watcher.stdout], daemon=True).start()
    try:
        wait_until(lambda: "watching\n" in lines, what="the example subscribed")
        card = vcard_factory("a").insert()
        wait_until(lambda: any(l.startswith("TokenInserted /org/pincache/token/") for l in lines),
                   timeout=30, what="TokenInserted from the example")
        card.pull()
        wait_until(lambda: any(l.startswith("TokenRemoved /org/pincache/token/") for l in lines),
                   timeout=30, what="TokenRemoved from the example")
        assert any(l.startswith("Present /org/pincache/token/") and l.strip().endswith("false") for l in lines), lines
    finally:
        watcher.kill()
        watcher.wait()
