"""A cached PIN the token rejects is never replayed (fault shim between daemon and SoftHSM)."""

import pytest

from pincache_client import digest, EC_KEY, ERR, PIN, CallError, verify, wait_until

MSG = b"pincache stale-pin message"
CKU_USER = 1
CKR_OK = 0
CKR_PIN_INCORRECT = 0xA0
CKR_SESSION_HANDLE_INVALID = 0xB3
CKF_USER_PIN_COUNT_LOW = 0x10000


@pytest.fixture
def daemon(start_daemon, faultshim):
    return start_daemon(caching=True, module="shim", shim=faultshim)


def test_shim_is_the_backend(daemon, make_client, faultshim):
    c = make_client()
    assert c.token_props(c.token())["Module"] == str(faultshim.lib)


def test_stale_pin_purged_everywhere_with_one_backend_failure(daemon, make_client, faultshim, tokens):
    clients = [make_client(f"C{i}") for i in range(5)]
    tok = clients[0].token()
    sessions = []
    for c in clients:
        s = c.open_session(tok)
        c.login(s, PIN)
        sessions.append(s)
        assert c.cached() == {tok}
    logged = faultshim.logins()
    assert logged == [(CKU_USER, CKR_OK)] * 5, logged
    faultshim.reject_pin(PIN)  # "the PIN was changed elsewhere"
    errors = [c.error(c.sign, s, EC_KEY, "ECDSA", digest(MSG)) for c, s in zip(clients, sessions)]
    assert errors == [ERR + "PinIncorrect"] + [ERR + "NotLoggedIn"] * 4
    new = faultshim.logins()[5:]
    assert new == [(CKU_USER, CKR_PIN_INCORRECT)], f"backend C_Logins after the PIN change: {new}"
    for c in clients:
        st = c.caller_state()
        assert st["Cached"] == [] and st["LoggedIn"] == [], (c.name, st)


def test_backend_error_message_carries_ckr(daemon, make_client, faultshim):
    c = make_client()
    s = c.open_session(c.token())
    c.login(s, PIN)
    faultshim.reject_pin(PIN)
    with pytest.raises(CallError) as e:
        c.sign(s, EC_KEY, "ECDSA", digest(MSG))
    assert e.value.name == ERR + "PinIncorrect"
    assert "CKR_PIN_INCORRECT (0xa0)" in e.value.message, e.value.message


def test_count_low_holds_cached_pins_back_without_destroying_them(daemon, make_client, faultshim, tokens):
    """Issue 12 §4: never presented to a counting token, but kept for when it counts no more."""
    a, b = make_client("A"), make_client("B")
    tok = a.token()
    sa, sb = a.open_session(tok), b.open_session(tok)
    a.login(sa, PIN)
    b.login(sb, PIN)
    sig = a.sign(sa, EC_KEY, "ECDSA", digest(MSG))
    verify(tokens.cert("ec"), "ECDSA", MSG, sig)
    faultshim.token_flags_add(CKF_USER_PIN_COUNT_LOW)
    before = len(faultshim.logins())
    with pytest.raises(CallError) as e:
        a.sign(sa, EC_KEY, "ECDSA", digest(MSG))
    assert e.value.name == ERR + "NotLoggedIn" and "held back" in e.value.message, e.value.message
    assert b.error(b.sign, sb, EC_KEY, "ECDSA", digest(MSG)) == ERR + "NotLoggedIn"
    assert len(faultshim.logins()) == before, "a cached PIN was presented to a COUNT_LOW token"
    assert a.cached() == {tok} and b.cached() == {tok}
    assert a.token_props(tok)["UserPinCountLow"] is True
    faultshim.token_flags_clear()  # someone logged in successfully: the counter is reset
    for c, s in ((a, sa), (b, sb)):
        verify(tokens.cert("ec"), "ECDSA", MSG, c.sign(s, EC_KEY, "ECDSA", digest(MSG)))


def test_a_held_back_caller_may_log_in_again(daemon, make_client, faultshim, tokens):
    a = make_client("A")
    tok = a.token()
    sa = a.open_session(tok)
    a.login(sa, PIN)
    assert a.error(a.login, sa, PIN) == ERR + "AlreadyLoggedIn"
    faultshim.token_flags_add(CKF_USER_PIN_COUNT_LOW)
    a.login(sa, PIN)  # the PIN typed now replaces the held one
    assert faultshim.logins()[-1] == (CKU_USER, CKR_OK)
    faultshim.token_flags_clear()
    verify(tokens.cert("ec"), "ECDSA", MSG, a.sign(sa, EC_KEY, "ECDSA", digest(MSG)))


@pytest.mark.parametrize("caching", [True, False])
def test_login_on_a_stale_backend_session_is_retried_once(start_daemon, make_client, faultshim, tokens, caching):
    """A card reset or swap can leave the daemon's backend session dead before a C_Login;
    the PIN never reached a card then, and the daemon tries once more on a fresh session."""
    start_daemon(caching=caching, module="shim", shim=faultshim)
    c = make_client()
    tok = c.token()
    s = c.open_session(tok)
    faultshim.stale_session_once()
    c.login(s, PIN)
    assert faultshim.logins() == [(CKU_USER, CKR_SESSION_HANDLE_INVALID), (CKU_USER, CKR_OK)]
    assert not (faultshim.dir / "stale_session_once").exists()
    verify(tokens.cert("ec"), "ECDSA", MSG, c.sign(s, EC_KEY, "ECDSA", digest(MSG)))


CKR_GENERAL_ERROR = 0x5
CKR_DEVICE_REMOVED = 0x32


def test_a_failing_token_info_is_not_a_removal(daemon, make_client, faultshim, tokens):
    """Issue 12 §6: C_GetTokenInfo failing (SoftHSM racing on its files) while the slot still
    reports the token: the token stays present, every cache is kept, no cached PIN is sent
    while the token's flags are unknown, and all works again once it answers."""
    a, b = make_client("A"), make_client("B")
    tok = a.token()
    sa, sb = a.open_session(tok), b.open_session(tok)
    a.login(sa, PIN)
    b.login(sb, PIN)
    faultshim.token_info_fail(CKR_GENERAL_ERROR, count=4)  # every try of one refresh
    before = len(faultshim.logins())
    with pytest.raises(CallError) as e:
        a.sign(sa, EC_KEY, "ECDSA", digest(MSG))
    assert "did not report its state" in e.value.message, e.value.message
    assert len(faultshim.logins()) == before, "a cached PIN was sent while the flags were unknown"
    assert a.cached() == {tok} and b.cached() == {tok}
    assert a.token_props(tok)["Present"] is True
    # The fault is over: both sign with the PINs they cached, nothing re-entered.
    for c, s in ((a, sa), (b, sb)):
        verify(tokens.cert("ec"), "ECDSA", MSG, c.sign(s, EC_KEY, "ECDSA", digest(MSG)))
    faultshim.token_info_fail(CKR_GENERAL_ERROR, count=2)  # a blip the retries absorb
    verify(tokens.cert("ec"), "ECDSA", MSG, a.sign(sa, EC_KEY, "ECDSA", digest(MSG)))
    assert not (faultshim.dir / "token_info_fail").exists()


def test_repeated_device_removed_is_a_removal(daemon, make_client, faultshim, tokens):
    """Only a confirmed removal clears the caches, and it says so in the log."""
    a = make_client("A")
    tok = a.token()
    s = a.open_session(tok)
    a.login(s, PIN)
    faultshim.token_info_fail(CKR_DEVICE_REMOVED)
    with pytest.raises(CallError):
        a.sign(s, EC_KEY, "ECDSA", digest(MSG))
    assert a.cached() == set()
    faultshim.token_info_ok()
    wait_until(lambda: "cached PIN(s) wiped" in daemon.stderr_text(), what="the removal in the log")
    assert "removed (C_GetTokenInfo" in daemon.stderr_text()
