"""The fixtures themselves, checked without pincached: if these fail, every
daemon test's result means nothing."""

import subprocess

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from conftest import SOFTHSM_MODULE, need
from pincache_client import PIN, Client, input_for, verify

P11 = "pkcs11-tool"


def p11(module, env, *args, check=True):
    return subprocess.run([P11, "--module", str(module), *args], env={**env, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, check=check, timeout=60)


def test_private_bus_accepts_connections(bus):
    a, b = Client(bus.address), Client(bus.address)
    try:
        assert a.unique_name != b.unique_name
        names = a.conn.list_names()
        assert b.unique_name in names
    finally:
        a.close()
        b.close()
    assert str(bus.socket).endswith("bus.sock") and bus.socket.exists()


def test_tokens_have_keys_and_certificates(tokens):
    out = p11(SOFTHSM_MODULE, tokens.env(), "-L").stdout
    assert "pincache-demo" in out and "pincache-second" in out
    assert "uninitialized" in out  # SoftHSM's spare slot, which the daemon must tolerate
    objs = p11(SOFTHSM_MODULE, tokens.env(), "--token-label", "pincache-demo", "-O",
               "--login", "--pin", PIN).stdout
    assert objs.count("Private Key Object") == 2
    assert objs.count("Certificate Object") == 2
    ec_cert, rsa_cert = tokens.cert("ec"), tokens.cert("rsa")
    ku = ec_cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.content_commitment
    ku = rsa_cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.content_commitment
    assert ec_cert.public_key().key_size == 256
    assert rsa_cert.public_key().key_size == 2048
    # The two tokens must not share keys, or a cross-token mix-up would go unseen.
    assert tokens.cert("ec").public_key() != tokens.cert("ec", "pincache-second").public_key()


@pytest.mark.parametrize("mechanism,key_id", [("ECDSA-SHA256", "01"), ("ECDSA", "01"),
                                              ("SHA256-RSA-PKCS", "02"), ("RSA-PKCS", "02"),
                                              ("RSA-PSS-SHA256", "02")])
def test_verifier_accepts_pkcs11_signatures(tokens, tmp_path, mechanism, key_id):
    """The verifier the daemon tests rely on accepts what SoftHSM itself produces
    and rejects a tampered signature."""
    message = b"pincache verifier self-test"
    # SoftHSM 2.6 has no CKM_ECDSA_SHA256: sign the hash with raw ECDSA, which is
    # the same signature, so the verifier's hashing path is still exercised.
    data = input_for("ECDSA" if mechanism == "ECDSA-SHA256" else mechanism, message)
    (tmp_path / "in").write_bytes(data)
    p11_mech = {"ECDSA-SHA256": "ECDSA", "ECDSA": "ECDSA", "SHA256-RSA-PKCS": "SHA256-RSA-PKCS",
                "RSA-PKCS": "RSA-PKCS", "RSA-PSS-SHA256": "SHA256-RSA-PKCS-PSS"}[mechanism]
    extra = ["--mgf", "MGF1-SHA256", "--salt-len", "32"] \
        if "PSS" in mechanism else []
    p11(SOFTHSM_MODULE, tokens.env(), "--token-label", "pincache-demo", "--login", "--pin", PIN,
        "--sign", "--id", key_id, "-m", p11_mech, *extra,
        "--input-file", str(tmp_path / "in"), "--output-file", str(tmp_path / "sig"))
    sig = (tmp_path / "sig").read_bytes()
    cert = tokens.cert("ec" if key_id == "01" else "rsa")
    verify(cert, mechanism, message, sig)
    with pytest.raises(InvalidSignature):
        verify(cert, mechanism, message + b"!", sig)


def test_faultshim_rejects_pin_and_logs(faultshim, tokens):
    env = {**tokens.env(), **faultshim.env()}
    ok = p11(faultshim.lib, env, "--token-label", "pincache-demo", "--login", "--pin", PIN, "-O")
    assert "Private Key Object" in ok.stdout
    assert faultshim.logins() == [(1, 0)]
    faultshim.reject_pin(PIN)
    bad = p11(faultshim.lib, env, "--token-label", "pincache-demo", "--login", "--pin", PIN, "-O",
              check=False)
    assert bad.returncode != 0
    assert "CKR_PIN_INCORRECT" in bad.stdout + bad.stderr
    assert faultshim.logins() == [(1, 0), (1, 0xa0)]
    # Not forwarded: SoftHSM's own retry counter is untouched, the token still works.
    again = p11(SOFTHSM_MODULE, tokens.env(), "--token-label", "pincache-demo", "--login", "--pin", PIN, "-O")
    assert "Private Key Object" in again.stdout


def test_faultshim_adds_token_flags(faultshim, tokens):
    env = {**tokens.env(), **faultshim.env()}
    before = p11(faultshim.lib, env, "-L").stdout
    assert "count low" not in before.lower()
    faultshim.token_flags_add(0x10000)
    after = p11(faultshim.lib, env, "-L").stdout
    assert "user pin count low" in after.lower(), after
