"""The virtual OpenPGP card straight through pcscd + vpcd + OpenSC, without pincached:
proves the test card itself before the daemon's card tests rely on it.

Run: /usr/bin/python3 -m pytest -v Tests/integration/test_vcard_direct.py   (as root)
With CI=true a missing pcscd, vpcd, vicc or OpenSC fails instead of skipping.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support" / "vcard"))

import openpgp_card  # noqa: E402
import p11  # noqa: E402
from fixtures import (ADMIN_PIN, OPENSC_PKCS11, PIN, READER, READER2,  # noqa: E402,F401
                      need, opensc_env, pcscd, vcard_factory, vicc_factory, wait_for)

from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, padding  # noqa: E402

SIG_LABEL = "OpenPGP card (User PIN (sig))"
USER_LABEL = "OpenPGP card (User PIN)"
MESSAGE = b"pincache virtual card test message\n"


# --- pkcs11-tool helpers ------------------------------------------------------------

def tool(env, *args, check=True):
    need(shutil.which("pkcs11-tool"), "pkcs11-tool missing (apt-get install opensc)")
    r = subprocess.run(["pkcs11-tool", "--module", OPENSC_PKCS11, *args], env=env,
                       capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        pytest.fail(f"pkcs11-tool {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def list_slots(env):
    """pkcs11-tool -L parsed: [{id, reader, label, serial, empty, unrecognized}]."""
    out = tool(env, "-L").stdout
    slots, cur = [], None
    for line in out.splitlines():
        m = re.match(r"Slot \d+ \((0x[0-9a-f]+)\): (.*)$", line)
        if m:
            cur = {"id": m.group(1), "reader": m.group(2).strip(), "label": None,
                   "serial": None, "empty": False, "unrecognized": False}
            slots.append(cur)
            continue
        if cur is None:
            continue
        s = line.strip()
        if s == "(empty)":
            cur["empty"] = True
        elif s == "(token not recognized)":
            cur["unrecognized"] = True
        elif s.startswith("token label"):
            cur["label"] = s.split(":", 1)[1].strip()
        elif s.startswith("serial num"):
            cur["serial"] = s.split(":", 1)[1].strip()
    return slots


def slot_id(env, card, label=SIG_LABEL):
    for s in list_slots(env):
        if s["serial"] == card.token_serial and s["label"] == label:
            return s["id"]
    pytest.fail(f"no slot '{label}' for card {card.token_serial}:\n{tool(env, '-L').stdout}")


def read_pubkey(env, slot, key_id, tmp_path):
    out = tmp_path / f"pub-{slot}-{key_id}.der"
    tool(env, "--slot", slot, "--read-object", "--type", "pubkey", "--id", key_id, "-o", str(out))
    return serialization.load_der_public_key(out.read_bytes())


def sign(env, slot, key_id, mechanism, tmp_path, pin=PIN, check=True):
    msg = tmp_path / "msg"
    msg.write_bytes(MESSAGE)
    sig = tmp_path / f"sig-{key_id}"
    args = ["--slot", slot, "--login", "--pin", pin, "--sign", "-m", mechanism, "--id", key_id,
            "-i", str(msg), "-o", str(sig)]
    if mechanism.startswith("ECDSA"):
        args += ["--signature-format", "openssl"]  # DER, as python-cryptography wants
    r = tool(env, *args, check=check)
    return r, (sig.read_bytes() if r.returncode == 0 else None)


def verify(pub, signature, key_type):
    if key_type == "p256":
        pub.verify(signature, MESSAGE, ec.ECDSA(hashes.SHA256()))
    else:
        pub.verify(signature, MESSAGE, padding.PKCS1v15(), hashes.SHA256())


MECH = {"p256": "ECDSA-SHA256", "rsa2048": "SHA256-RSA-PKCS"}


# --- tests --------------------------------------------------------------------------

def test_card_listed_with_serial(pcscd, vcard_factory, opensc_env):
    card = vcard_factory("a", serial="12345678").insert()
    slots = [s for s in list_slots(opensc_env) if s["reader"] == READER]
    assert {s["label"] for s in slots} == {SIG_LABEL, USER_LABEL}
    assert {s["serial"] for s in slots} == {"ffff12345678"}
    assert card.serial == "12345678"
    # The second reader has no card.
    assert [s["empty"] for s in list_slots(opensc_env) if s["reader"] == READER2] == [True]


def test_objects(pcscd, vcard_factory, opensc_env):
    card = vcard_factory("a").insert()
    sig_out = tool(opensc_env, "--slot", slot_id(opensc_env, card), "-O", "--login", "--pin", PIN).stdout
    user_out = tool(opensc_env, "--slot", slot_id(opensc_env, card, USER_LABEL), "-O",
                    "--login", "--pin", PIN).stdout
    assert re.search(r"Private Key Object; EC\s+label:\s+Signature key\s+ID:\s+01\s+Usage:\s+sign", sig_out), sig_out
    assert re.search(r"Private Key Object; EC\s+label:\s+Authentication key\s+ID:\s+03\s+Usage:\s+sign", user_out), user_out
    assert "Encryption key" in user_out
    for label in ("Signature key", "Authentication key", "Encryption key"):
        assert re.search(rf"Public Key Object; EC\s+EC_POINT 256 bits.*?label:\s+{label}",
                         sig_out + user_out, re.S), label


@pytest.mark.parametrize("key_type", ["p256", "rsa2048"])
def test_login_and_sign_verifies(pcscd, vcard_factory, opensc_env, tmp_path, key_type):
    card = vcard_factory("a", key_type=key_type).insert()
    slot = slot_id(opensc_env, card)
    pub = read_pubkey(opensc_env, slot, "01", tmp_path)
    # What OpenSC read from the card is the card's key.
    assert pub.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo) == card.public_key_pem("sig")
    _, signature = sign(opensc_env, slot, "01", MECH[key_type], tmp_path)
    verify(pub, signature, key_type)
    assert card.counters()["signature_counter"] == 1
    ops = [e.get("op") for e in card.apdus() if e.get("ins") == "PSO"]
    assert ops == ["sign"]

    # The authentication key signs with INTERNAL AUTHENTICATE, under VERIFY 82.
    user_slot = slot_id(opensc_env, card, USER_LABEL)
    aut_pub = read_pubkey(opensc_env, user_slot, "03", tmp_path)
    _, aut_sig = sign(opensc_env, user_slot, "03", MECH[key_type], tmp_path)
    verify(aut_pub, aut_sig, key_type)
    assert any(e.get("ins") == "INTERNAL_AUTHENTICATE" and e["sw"] == "9000" for e in card.apdus())
    assert {e["ref"] for e in card.verifies()} == {"81", "82"}


def test_rsa_decipher(pcscd, vcard_factory, opensc_env, tmp_path):
    card = vcard_factory("a", key_type="rsa2048").insert()
    slot = slot_id(opensc_env, card, USER_LABEL)
    pub = read_pubkey(opensc_env, slot, "02", tmp_path)
    ct = tmp_path / "ct"
    ct.write_bytes(pub.encrypt(b"the session key", padding.PKCS1v15()))
    out = tmp_path / "pt"
    tool(opensc_env, "--slot", slot, "--login", "--pin", PIN, "--decrypt", "-m", "RSA-PKCS",
         "--id", "02", "-i", str(ct), "-o", str(out))
    assert out.read_bytes() == b"the session key"
    pso = [e for e in card.apdus() if e.get("op") == "decipher"]
    # 00 padding indicator + 256 bytes, in one extended-length APDU.
    assert [(e["lc"], e.get("chained", False)) for e in pso] == [(257, False)]


def test_ecdh_decipher(pcscd, vcard_factory, opensc_env, tmp_path):
    card = vcard_factory("a", key_type="p256").insert()
    slot = slot_id(opensc_env, card, USER_LABEL)
    card_pub = read_pubkey(opensc_env, slot, "02", tmp_path)
    peer = ec.generate_private_key(ec.SECP256R1())
    peer_der = tmp_path / "peer.der"
    peer_der.write_bytes(peer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    out = tmp_path / "secret"
    tool(opensc_env, "--slot", slot, "--login", "--pin", PIN, "--derive", "-m", "ECDH1-DERIVE",
         "--id", "02", "-i", str(peer_der), "-o", str(out))
    assert out.read_bytes() == peer.exchange(ec.ECDH(), card_pub)
    assert [e["sw"] for e in card.apdus() if e.get("op") == "decipher"] == ["9000"]


def test_chaining_without_extended_length(pcscd, vcard_factory, opensc_env, tmp_path):
    card = vcard_factory("a", key_type="rsa2048", extended_length=False).insert()
    slot = slot_id(opensc_env, card)
    pub = read_pubkey(opensc_env, slot, "01", tmp_path)
    _, signature = sign(opensc_env, slot, "01", "SHA256-RSA-PKCS", tmp_path)
    verify(pub, signature, "rsa2048")

    user_slot = slot_id(opensc_env, card, USER_LABEL)
    enc = read_pubkey(opensc_env, user_slot, "02", tmp_path)
    ct = tmp_path / "ct"
    ct.write_bytes(enc.encrypt(b"chained", padding.PKCS1v15()))
    out = tmp_path / "pt"
    tool(opensc_env, "--slot", user_slot, "--login", "--pin", PIN, "--decrypt", "-m", "RSA-PKCS",
         "--id", "02", "-i", str(ct), "-o", str(out))
    assert out.read_bytes() == b"chained"
    log = card.apdus()
    assert any(e.get("chained") and e.get("ins") == "PSO" for e in log), "257 bytes must be chained"
    # 256-byte signatures and 269-byte public keys come back through GET RESPONSE.
    assert any(e.get("ins") == "GET_RESPONSE" and e["sw"] == "9000" for e in log)


def test_wrong_pin_decrements_and_right_pin_resets(pcscd, vcard_factory, opensc_env, tmp_path):
    card = vcard_factory("a").insert()
    slot = slot_id(opensc_env, card)
    assert card.counters()["pw1"] == 3
    r, _ = sign(opensc_env, slot, "01", "ECDSA-SHA256", tmp_path, pin="654321", check=False)
    assert r.returncode != 0 and "CKR_PIN_INCORRECT" in r.stderr
    assert card.counters()["pw1"] == 2
    r, _ = sign(opensc_env, slot, "01", "ECDSA-SHA256", tmp_path, pin="000000", check=False)
    assert card.counters()["pw1"] == 1
    sign(opensc_env, slot, "01", "ECDSA-SHA256", tmp_path)
    assert card.counters()["pw1"] == 3
    v = card.verifies()
    assert [e["matched"] for e in v] == [False, False, True]
    assert v[-1]["pin_sha256"] == hashlib.sha256(PIN.encode()).hexdigest()


def test_three_wrong_pins_block(pcscd, vcard_factory, opensc_env, tmp_path):
    card = vcard_factory("a").insert()
    slot = slot_id(opensc_env, card)
    rcs = []
    for n in range(3):
        r, _ = sign(opensc_env, slot, "01", "ECDSA-SHA256", tmp_path, pin=f"99999{n}", check=False)
        rcs.append(r.stderr)
    assert card.counters()["pw1"] == 0
    assert "CKR_PIN_INCORRECT" in rcs[0] and "CKR_PIN_LOCKED" in rcs[2], rcs
    # Blocked: even the right PIN is refused, without being compared.
    r, _ = sign(opensc_env, slot, "01", "ECDSA-SHA256", tmp_path, check=False)
    assert r.returncode != 0 and "CKR_PIN_LOCKED" in r.stderr, r.stderr
    last = card.verifies()[-1]
    assert last["sw"] == "6983" and "matched" not in last
    assert card.counters()["pw1"] == 0
    # The token info says so as well.
    assert "user PIN locked" in tool(opensc_env, "-L").stdout

    # Blocked survives re-insertion: it is card state, not OpenSC's.
    card.pull()
    card.insert()
    assert card.counters()["pw1"] == 0
    r, _ = sign(opensc_env, slot_id(opensc_env, card), "01", "ECDSA-SHA256", tmp_path, check=False)
    assert "CKR_PIN_LOCKED" in r.stderr
    assert card.counters()["pw1"] == 0


def test_pull_empties_slot_and_reinsert_is_same_token(pcscd, vcard_factory, opensc_env, tmp_path):
    card = vcard_factory("a", serial="0badcafe").insert()
    slot = slot_id(opensc_env, card)
    before = read_pubkey(opensc_env, slot, "01", tmp_path).public_numbers()

    card.pull()
    assert not pcscd.card_present(READER)
    reader_slots = [s for s in list_slots(opensc_env) if s["reader"] == READER]
    assert reader_slots and all(s["empty"] for s in reader_slots), reader_slots

    card.insert()
    assert {s["serial"] for s in list_slots(opensc_env) if s["reader"] == READER} == {"ffff0badcafe"}
    slot = slot_id(opensc_env, card)
    assert read_pubkey(opensc_env, slot, "01", tmp_path).public_numbers() == before
    _, signature = sign(opensc_env, slot, "01", "ECDSA-SHA256", tmp_path)
    verify(read_pubkey(opensc_env, slot, "01", tmp_path), signature, "p256")


def test_pull_during_session(pcscd, vcard_factory):
    card = vcard_factory("a").insert()
    with p11.Module() as m:
        session = m.open(m.find_slot(card.token_serial, "User PIN (sig)"))
        session.login(PIN)
        key = session.find(p11.CKO_PRIVATE_KEY, b"\x01")[0]
        assert len(session.sign(key, p11.CKM_ECDSA, b"\x42" * 32)) == 64
        card.pull()
        with pytest.raises(p11.P11Error) as e:
            session.sign(key, p11.CKM_ECDSA, b"\x42" * 32)
        assert e.value.name in ("CKR_DEVICE_REMOVED", "CKR_SESSION_HANDLE_INVALID",
                                "CKR_TOKEN_NOT_PRESENT", "CKR_SESSION_CLOSED"), e.value.name


def test_other_card_same_reader(pcscd, vcard_factory, opensc_env, tmp_path):
    a = vcard_factory("a", serial="aaaaaaaa", pin="111111").insert()
    sign(opensc_env, slot_id(opensc_env, a), "01", "ECDSA-SHA256", tmp_path, pin="111111")
    a.pull()
    b = vcard_factory("b", serial="bbbbbbbb", pin="222222").insert()
    assert {s["serial"] for s in list_slots(opensc_env) if s["reader"] == READER} == {"ffffbbbbbbbb"}
    sign(opensc_env, slot_id(opensc_env, b), "01", "ECDSA-SHA256", tmp_path, pin="222222")
    a_pin = hashlib.sha256(b"111111").hexdigest()
    assert a_pin in {e["pin_sha256"] for e in a.verifies()}
    assert a_pin not in {e["pin_sha256"] for e in b.verifies()}
    # The log never holds a PIN itself.
    for card, pin in ((a, b"111111"), (b, b"222222")):
        text = (card.state_dir / "apdu.log").read_bytes()
        assert pin not in text and pin.hex().encode() not in text


def test_change_pin_directly(pcscd, vcard_factory, opensc_env, tmp_path):
    card = vcard_factory("a").insert()
    slot = slot_id(opensc_env, card)
    tool(opensc_env, "--slot", slot, "--change-pin", "--pin", PIN, "--new-pin", "654321")
    change = [e for e in card.apdus() if e.get("ins") == "CHANGE_REFERENCE_DATA"]
    assert [(e["ref"], e["matched"], e["sw"]) for e in change] == [("81", True, "9000")]
    r, _ = sign(opensc_env, slot, "01", "ECDSA-SHA256", tmp_path, check=False)
    assert "CKR_PIN_INCORRECT" in r.stderr
    assert card.counters()["pw1"] == 2
    sign(opensc_env, slot, "01", "ECDSA-SHA256", tmp_path, pin="654321")
    assert card.counters()["pw1"] == 3


def test_pw1_single_use(pcscd, vcard_factory):
    """C4 byte 0 = 00: one PSO:CDS per VERIFY 81. OpenSC 0.23 does not turn this into
    CKA_ALWAYS_AUTHENTICATE; the card refuses the second signature, whatever OpenSC says."""
    card = vcard_factory("a", pw1_single_use=True).insert()
    with p11.Module() as m:
        session = m.open(m.find_slot(card.token_serial, "User PIN (sig)"))
        session.login(PIN)
        key = session.find(p11.CKO_PRIVATE_KEY, b"\x01")[0]
        assert len(session.sign(key, p11.CKM_ECDSA, b"\x01" * 32)) == 64
        with pytest.raises(p11.P11Error) as e:
            session.sign(key, p11.CKM_ECDSA, b"\x02" * 32)
        assert e.value.name == "CKR_USER_NOT_LOGGED_IN"
        # OpenSC has marked the session logged out on that error: log in again.
        session.login(PIN)
        assert len(session.sign(key, p11.CKM_ECDSA, b"\x03" * 32)) == 64
    signs = [e["sw"] for e in card.apdus() if e.get("op") == "sign"]
    assert signs == ["9000", "6982", "9000"]
    assert card.counters()["pw1_single_use"] is True


def test_multi_use_signs_twice(pcscd, vcard_factory):
    card = vcard_factory("a").insert()
    with p11.Module() as m:
        session = m.open(m.find_slot(card.token_serial, "User PIN (sig)"))
        session.login(PIN)
        key = session.find(p11.CKO_PRIVATE_KEY, b"\x01")[0]
        point = session.attribute(session.find(p11.CKO_PUBLIC_KEY, b"\x01")[0], p11.CKA_EC_POINT)
        pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point[2:])  # DER OCTET STRING
        for i in range(2):
            digest = hashlib.sha256(b"%d" % i).digest()
            raw = session.sign(key, p11.CKM_ECDSA, digest)
            from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
            der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
            pub.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    assert card.counters()["signature_counter"] == 2


def test_vicc_is_unrecognised(pcscd, vcard_factory, vicc_factory, opensc_env):
    card = vcard_factory("a").insert()
    vicc = vicc_factory(reader_index=1).insert()
    assert pcscd.card_present(READER2)
    slots = list_slots(opensc_env)
    other = [s for s in slots if s["reader"] == READER2]
    assert [s["unrecognized"] for s in other] == [True], slots
    assert {s["serial"] for s in slots if s["reader"] == READER} == {card.token_serial}
    with p11.Module() as m:
        vslots = [s for s in m.slots() if m.slot_info(s)["description"] == READER2]
        assert len(vslots) == 1
        assert m.slot_info(vslots[0])["flags"] & p11.CKF_TOKEN_PRESENT
        with pytest.raises(p11.P11Error) as e:
            m.token_info(vslots[0])
        assert e.value.name == "CKR_TOKEN_NOT_RECOGNIZED"
    vicc.pull()
    assert [s["empty"] for s in list_slots(opensc_env) if s["reader"] == READER2] == [True]


def test_pcscd_restart_card_reconnects(pcscd, vcard_factory, opensc_env):
    """pcscd going away pulls the card (its link drops); inserting again after the
    restart gives the same token. This is the daemon tests' pcscd-restart scenario."""
    import signal as _signal
    card = vcard_factory("a").insert()
    pcscd.stop(sig=_signal.SIGKILL, keep_lock=True)
    wait_for(lambda: not card.inserted, 10, "card process to notice vpcd is gone")
    pcscd.start()
    assert not pcscd.card_present(READER)
    card.insert()
    assert {s["serial"] for s in list_slots(opensc_env) if s["reader"] == READER} == {card.token_serial}


# --- the card alone (no pcscd): robustness against anything OpenSC or others send ----

@pytest.fixture
def bare_card(tmp_path):
    return openpgp_card.Card(str(tmp_path / "bare"), "01020304", PIN, ADMIN_PIN, "p256",
                             False, True)


def test_unexpected_apdus_get_status_words(bare_card):
    samples = [b"", b"\x00", b"\x00\xA4", b"\x00\xA4\x04", b"\xFF\xFF\xFF\xFF",
               b"\x80\xCA\x00\x6E\x00", b"\x00\x12\x00\x00", b"\x00\xA4\x04\x00\x05\xA0\x00",
               b"\x00\xA4\x04\x00\x02\xD2\x76\x00", b"\x00\xCA\x00\x6E\x00\x00",
               b"\x00\x20\x00\x81\x10" + b"1" * 3]
    for apdu in samples:
        out = bare_card.process(apdu)
        assert len(out) >= 2, apdu
    assert bare_card.process(b"\x00\xB0\x00\x00\x00")[-2:] == b"\x6D\x00"  # not selected, unknown INS
    select = b"\x00\xA4\x04\x00\x06\xD2\x76\x00\x01\x24\x01\x00"
    assert bare_card.process(select) == b"\x90\x00"
    assert bare_card.process(b"\x00\xB0\x00\x00\x00")[-2:] == b"\x6D\x00"
    assert bare_card.process(b"\x00\xCA\x01\x99\x00")[-2:] == b"\x6A\x88"
    assert bare_card.process(b"\x00\x2A\x9E\x9A\x02\x01\x02\x00")[-2:] == b"\x69\x82"
    # Extended GET DATA returns the whole 6E; the AID carries the serial.
    out = bare_card.process(b"\x00\xCA\x00\x6E\x00\x00\x00")
    assert out[-2:] == b"\x90\x00" and bytes.fromhex("D2760001240103 04FFFF01020304".replace(" ", "")) in out
    # Random junk never raises and never changes the retry counters.
    import random
    rnd = random.Random(5)
    for _ in range(2000):
        apdu = bytes(rnd.randrange(256) for _ in range(rnd.randrange(0, 12)))
        if len(apdu) >= 2 and apdu[1] in (0x20, 0x24, 0x2C):
            continue
        assert len(bare_card.process(apdu)) >= 2
    assert bare_card.state["tries"] == {"81": 3, "83": 3}
    assert "internal error" not in (Path(bare_card.dir) / "card.log").read_text()


def test_verify_status_query_costs_no_try(bare_card):
    select = b"\x00\xA4\x04\x00\x06\xD2\x76\x00\x01\x24\x01\x00"
    bare_card.process(select)
    assert bare_card.process(b"\x00\x20\x00\x81") == b"\x63\xC3"
    assert bare_card.process(b"\x00\x20\x00\x81\x06" + b"000000") == b"\x63\xC2"
    assert bare_card.process(b"\x00\x20\x00\x81") == b"\x63\xC2"
    assert bare_card.process(b"\x00\x20\x00\x81\x06" + PIN.encode()) == b"\x90\x00"
    assert bare_card.process(b"\x00\x20\x00\x81") == b"\x90\x00"
    assert bare_card.process(b"\x00\x20\xFF\x81") == b"\x90\x00"  # logout
    assert bare_card.process(b"\x00\x20\x00\x81") == b"\x63\xC3"
