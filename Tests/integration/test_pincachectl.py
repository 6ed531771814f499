"""pincachectl on a private bus (issue 16 §5): pkcs11: URIs for tokens and keys, --no-legend,
--json everywhere. The same binary on the system bus with polkitd is in Tests/system."""

import json
import subprocess

import pytest

from conftest import need
from pincache_client import PIN

MSG = b"signed through a pkcs11: URI"


@pytest.fixture
def ctl(build_dir, bus, start_daemon):
    binary = build_dir / "pincachectl"
    need(binary.exists(), f"{binary} not built (swift build)")
    start_daemon(caching=True)

    def run(*args, stdin=None):
        return subprocess.run([str(binary), "--bus", bus.address, *args], input=stdin,
                              capture_output=True, timeout=60)
    return run


def ok(r):
    assert r.returncode == 0, (r.returncode, r.stderr.decode(errors="replace"))
    return r.stdout.decode()


def tokens(ctl):
    return {t["Label"]: t for t in json.loads(ok(ctl("tokens", "--json")))}


def test_tokens_and_keys_carry_their_uris(ctl):
    demo = tokens(ctl)["pincache-demo"]
    uri = demo["Uri"]
    assert uri.startswith("pkcs11:model=") and ";token=pincache-demo" in uri
    assert f";serial={demo['Serial']}" in uri
    keys = json.loads(ok(ctl("keys", "--json", uri)))
    assert {k["Id"] for k in keys} == {"01", "02"}
    ec = next(k for k in keys if k["Id"] == "01")
    assert ec["Uri"].startswith(uri + ";id=%01") and ec["Uri"].endswith(";type=private")


def test_a_uri_names_the_token_and_the_key(ctl):
    demo = tokens(ctl)["pincache-demo"]
    # A URI as p11tool prints it, with the module's attributes too: those select nothing here.
    uri = (f"pkcs11:model={demo['Model'].replace(' ', '%20')};manufacturer={demo['Manufacturer'].replace(' ', '%20')};"
           f"serial={demo['Serial']};token=pincache-demo;library-description=anything")
    keys = json.loads(ok(ctl("keys", "--json", uri + ";id=%02")))
    assert [k["Id"] for k in keys] == ["02"]
    # A token only by label, the key by id in the URI: no KEY-ID argument needed.
    tmp = subprocess.run(["mktemp"], capture_output=True, text=True).stdout.strip()
    open(tmp, "wb").write(MSG)
    r = ctl("sign", "--json", "--pin-stdin", "--mechanism", "ECDSA-SHA256", "--in", tmp,
            "pkcs11:token=pincache-demo;id=%01", stdin=(PIN + "\n").encode())
    signed = json.loads(ok(r))
    assert signed["KeyId"] == "01" and len(bytes.fromhex(signed["Signature"])) == 64
    # And by the key's label (object=), which names one key.
    label = next(k for k in json.loads(ok(ctl("keys", "--json", "pincache-demo"))) if k["Id"] == "02")["Label"]
    r = ctl("sign", "--json", "--pin-stdin", "--mechanism", "SHA256-RSA-PKCS", "--in", tmp,
            f"pkcs11:token=pincache-demo;object={label}", stdin=(PIN + "\n").encode())
    assert json.loads(ok(r))["KeyId"] == "02"


@pytest.mark.parametrize("uri, status, words", [
    ("pkcs11:token=pincache-demo?pin-value=1234", 64, "query attributes"),
    ("pkcs11:token=pincache-demo;colour=blue", 64, "unknown attribute 'colour'"),
    ("pkcs11:token=pincache-demo;token=x", 64, "given twice"),
    ("pkcs11:token=%zz", 64, "percent-encoding"),
    ("pkcs11:token=pincache-demo;type=cert", 64, "type=private"),
    ("pkcs11:token=no-such-token", 1, "no token matches"),
    ("pkcs11:manufacturer=SoftHSM%20project", 64, "add serial= or token="),
])
def test_bad_or_ambiguous_uris_are_clear_errors(ctl, uri, status, words):
    r = ctl("keys", uri)
    assert r.returncode == status, (r.returncode, r.stderr)
    assert words in r.stderr.decode(), r.stderr


def test_sign_refuses_a_uri_without_a_key_and_a_conflicting_id(ctl):
    r = ctl("sign", "--pin-stdin", "--mechanism", "ECDSA", "--in", "/dev/null", "pkcs11:token=pincache-demo")
    assert r.returncode == 64 and b"names no key" in r.stderr, r.stderr
    r = ctl("sign", "--pin-stdin", "--mechanism", "ECDSA", "--in", "/dev/null", "pkcs11:token=pincache-demo;id=%01", "02")
    assert r.returncode == 64 and b"different keys" in r.stderr, r.stderr
    r = ctl("sign", "--pin-stdin", "--mechanism", "ECDSA", "--in", "/dev/null", "pincache-demo")
    assert r.returncode == 64, r.stderr


def test_no_legend_drops_the_header_line(ctl):
    with_header = ok(ctl("tokens")).splitlines()
    without = ok(ctl("tokens", "--no-legend")).splitlines()
    assert with_header[0].startswith("ID ") and len(with_header) == len(without) + 1
    assert not any(line.startswith("ID ") for line in without)
    keys = ok(ctl("keys", "--no-legend", "pincache-demo")).splitlines()
    assert len(keys) == 2 and keys[0].split()[0] in ("01", "02")


@pytest.mark.parametrize("command", [["status"], ["tokens"], ["keys", "pincache-demo"], ["stats"]])
def test_json_everywhere_is_json(ctl, command):
    json.loads(ok(ctl(*command, "--json")))
