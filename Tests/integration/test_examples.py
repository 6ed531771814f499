"""The client examples in docs/examples run as documented against a daemon (issue 16 §6)."""

import subprocess
from pathlib import Path

from conftest import need
from pincache_client import EC_KEY, PIN, verify

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
