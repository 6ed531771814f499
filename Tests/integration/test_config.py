"""Configuration parsing and process lifecycle."""

import re
import signal
import subprocess
from pathlib import Path
import time

import pytest

from conftest import SOFTHSM_MODULE, need
from pincache_client import digest, EC_KEY, PIN, verify, wait_until


@pytest.mark.parametrize("bad_line", [
    "NoSuchKey=1",
    "P11_EnableCachePIN=yes",
    "P11_LogoutAfterSign=2",
    "ForceLoginBeforeSignKeyUsage=0x80",
    "ForceLoginBeforeSignKeyUsage=0xC0",
    "Module=relative/libsofthsm2.so",
    "MaxSessionsPerClient=-1",
    "PinCacheTimeout=soon",
    "this line has no equals sign",
])
def test_bad_config_exits_2_with_file_and_line(run_daemon, bad_line):
    text = f"# comment\nModule={SOFTHSM_MODULE}\n\n{bad_line}\n"
    cfg, r = run_daemon(text)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert re.search(re.escape(f"{cfg}:4:") + r"\s*\S", r.stderr), r.stderr


def test_bad_line_inside_app_section(run_daemon):
    text = f"Module={SOFTHSM_MODULE}\n[app /usr/bin/true]\nP11_EnableCachePIN=maybe\n"
    cfg, r = run_daemon(text)
    assert r.returncode == 2
    assert f"{cfg}:3:" in r.stderr, r.stderr


def test_missing_config_file_fails(pincached_bin, bus, daemon_env, tmp_path):
    need(pincached_bin.exists(), f"{pincached_bin} not built (swift build)")
    r = subprocess.run([str(pincached_bin), "--bus", bus.address, "--config", str(tmp_path / "nope.cfg")],
                       env=daemon_env, capture_output=True, text=True, timeout=20)
    assert r.returncode != 0
    assert "nope.cfg" in r.stderr


def test_windows_only_keys_accepted(start_daemon, make_client):
    start_daemon(caching=True, extra=["MD_EnableCachePIN=1", "CSP_EnableCachePIN=0", "CSP_LogoutAfterSign=1",
                                      "PinCacheTimeout=0", "SlotPollInterval=500", "# trailing comment"])
    assert make_client().manager_props()["CachingMode"] is True


def test_sigterm_exits_0_and_releases_name(start_daemon, bus):
    d = start_daemon(caching=True)
    assert d.stop() == 0, d.stderr_text()
    assert not bus.name_has_owner()


def test_pin_never_in_log(start_daemon, make_client, tokens):
    d = start_daemon(caching=True)
    a = make_client()
    s = a.open_session(a.token())
    secret = "73915846"  # wrong PIN, distinctive enough to grep for
    a.error(a.login, s, secret)
    a.login(s, PIN)
    verify(tokens.cert("ec"), "ECDSA", b"m", a.sign(s, EC_KEY, "ECDSA", digest(b"m")))
    assert d.stop() == 0
    log = d.stderr_text()
    assert secret not in log and PIN not in log


def test_pin_cache_timeout(start_daemon, make_client):
    start_daemon(caching=True, extra=["PinCacheTimeout=1"])
    a = make_client()
    tok = a.token()
    s = a.open_session(tok)
    a.login(s, PIN)
    assert a.cached() == {tok}
    deadline = time.monotonic() + 10
    while a.cached() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert a.cached() == set()


def test_sighup_reload_switching_mode_wipes_caches(start_daemon, make_client, tokens):
    from conftest import config_text
    d = start_daemon(caching=True)
    a = make_client("a")
    s = a.open_session(a.token())
    a.login(s)
    assert a.cached() == {a.token()}
    assert a.manager_props()["CachingMode"] is True
    d.config_path.write_text(config_text(caching=False, modules=[SOFTHSM_MODULE]))
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: a.manager_props()["CachingMode"] is False, what="CachingMode false after SIGHUP")
    assert a.cached() == set()
    assert a.caller_state()["CachingMode"] is False
    # Now non-caching: a login locks the token for its caller.
    a.login(s)
    assert a.locked() == {a.token()}
    verify(tokens.cert("ec"), "ECDSA", b"m", a.sign(s, EC_KEY, "ECDSA", digest(b"m")))


def test_sighup_with_a_bad_file_keeps_the_running_configuration(start_daemon, make_client):
    d = start_daemon(caching=True)
    a = make_client("a")
    s = a.open_session(a.token())
    a.login(s)
    d.config_path.write_text("P11_EnableCachePIN=perhaps\n")
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in d.stderr_text(), what="reload refused in the log")
    assert d.proc.poll() is None
    assert a.cached() == {a.token()}
    assert a.manager_props()["CachingMode"] is True


def test_daemon_refuses_its_own_proxy_as_a_backend(start_daemon, make_client, build_dir):
    proxy = build_dir / "libpincache-pkcs11.so"
    need(proxy.exists(), f"{proxy} not built (swift build)")
    d = start_daemon(text=f"Module={proxy}\nModule={SOFTHSM_MODULE}\n")
    assert "refusing to load" in d.stderr_text() and "proxy" in d.stderr_text()
    a = make_client()
    assert all("pincache" not in a.token_props(t)["Module"] for t in a.tokens())
    assert a.token()  # SoftHSM's token is still served


def _check(pincached_bin, *args):
    return subprocess.run([str(pincached_bin), *args], capture_output=True, text=True, timeout=20)


def test_check_config_accepts_a_valid_file(pincached_bin, tmp_path):
    """Issue 16 §4: `pincached --check-config FILE` checks without starting; exit 0."""
    need(pincached_bin.exists(), f"{pincached_bin} not built (swift build)")
    cfg = tmp_path / "ok.cfg"
    cfg.write_text(f"Module={SOFTHSM_MODULE}\nPinCacheTimeout=60\n[app /usr/bin/ssh]\nP11_EnableCachePIN=0\n")
    r = _check(pincached_bin, "--bus", "session", "--check-config", str(cfg))
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert f"{cfg}: valid (1 module(s) from Module=, 1 [app] section(s))" in r.stdout
    assert f"  module {SOFTHSM_MODULE}" in r.stdout
    # Without FILE it checks --config.
    r = _check(pincached_bin, "--bus", "session", "--config", str(cfg), "--check-config")
    assert r.returncode == 0, (r.returncode, r.stderr)


def test_without_module_lines_the_backends_are_p11_kits(pincached_bin, tmp_path):
    """Issue 16 §7: with no Module= line the daemon takes the modules libp11-kit's own loader
    gives a program called pincached: the registered SoftHSM and OpenSC, never p11-kit's
    trust module, never pincache's proxy (packaging/pincache.module says disable-in)."""
    need(pincached_bin.exists(), f"{pincached_bin} not built (swift build)")
    registrations = Path("/usr/share/p11-kit/modules")
    need((registrations / "softhsm2.module").exists(), "softhsm2 registers no p11-kit module here")
    cfg = tmp_path / "p11kit.cfg"
    cfg.write_text("PinCacheTimeout=60\n")
    r = _check(pincached_bin, "--bus", "session", "--check-config", str(cfg))
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert "from p11-kit's registrations" in r.stdout, r.stdout
    listed = [line.split("module ", 1)[1] for line in r.stdout.splitlines() if line.startswith("  module ")]
    assert any(m.endswith("libsofthsm2.so") for m in listed), r.stdout
    assert not any("p11-kit-trust" in m for m in listed), r.stdout
    assert not any("pincache" in m for m in listed), r.stdout
    # A relative `module:` is resolved by p11-kit in its own module directory, whatever the
    # architecture: OpenSC's registration says only "opensc-pkcs11.so".
    if (registrations / "opensc-pkcs11.module").exists():
        opensc = [m for m in listed if m.endswith("opensc-pkcs11.so")]
        assert opensc and opensc[0].startswith("/") and Path(opensc[0]).exists(), r.stdout


def test_check_config_refuses_with_file_and_line(pincached_bin, tmp_path):
    need(pincached_bin.exists(), f"{pincached_bin} not built (swift build)")
    cfg = tmp_path / "bad.cfg"
    cfg.write_text(f"Module={SOFTHSM_MODULE}\n\nP11_EnableCachePIN=maybe\n")
    r = _check(pincached_bin, "--bus", "session", "--check-config", str(cfg))
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert f"{cfg}:3:" in r.stderr, r.stderr


def test_check_config_names_a_module_that_does_not_load(pincached_bin, tmp_path):
    need(pincached_bin.exists(), f"{pincached_bin} not built (swift build)")
    fake = tmp_path / "not-a-module.so"
    fake.write_text("not an ELF file\n")
    cfg = tmp_path / "module.cfg"
    cfg.write_text(f"Module={fake}\n")
    r = _check(pincached_bin, "--bus", "session", "--check-config", str(cfg))
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert f"Module={fake}" in r.stderr, r.stderr


@pytest.mark.parametrize("args", [["--config"], ["--bus"], ["--print-introspection"], ["--bogus"],
                                  ["stray-file"], ["--bus", ""], ["--config", ""]])
def test_bad_arguments_are_usage_errors_not_crashes(pincached_bin, args):
    need(pincached_bin.exists(), f"{pincached_bin} not built (swift build)")
    r = _check(pincached_bin, *args)
    assert r.returncode == 64, (args, r.returncode, r.stderr)
    assert "Usage: pincached" in r.stderr or "Error:" in r.stderr, r.stderr


def test_print_introspection_to_a_missing_directory_fails_cleanly(pincached_bin, tmp_path):
    need(pincached_bin.exists(), f"{pincached_bin} not built (swift build)")
    r = _check(pincached_bin, "--print-introspection", str(tmp_path / "nonexistent"))
    assert r.returncode == 1 and "cannot write" in r.stderr, (r.returncode, r.stderr)
