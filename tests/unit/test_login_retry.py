"""SoftHSM2's token files being rewritten by another process: a login that fails with
CKR_GENERAL_ERROR is tried again a few times (a refused PIN never is), and a token missing from the
module's scan is looked for again in fresh scans, unless that would end a session of this process."""

from __future__ import annotations

import pytest
from pkcs11 import exceptions as p11

from iscl_hsm.keyholder import pkcs11 as holder_module
from iscl_hsm.keyholder.pkcs11 import find_token, log_in


class FlakyToken:
    """A token whose first ``failures`` logins raise ``error``; then it returns a session."""

    def __init__(self, failures: int, error: type[p11.PKCS11Error] = p11.GeneralError) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    def open(self, *, user_pin: str, rw: bool) -> str:
        assert user_pin == "1234" and rw
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error()
        return "session"


@pytest.mark.parametrize("error", [p11.GeneralError, p11.UserPinNotInitialized])
@pytest.mark.parametrize("failures", [0, 1, 3])
def test_what_a_half_rewritten_token_answers_at_login_is_tried_again(
    failures: int, error: type[p11.PKCS11Error]
) -> None:
    token = FlakyToken(failures, error)
    assert log_in(token, "1234", delays=(0, 0, 0)) == "session"
    assert token.calls == failures + 1


def test_the_last_general_error_is_raised_after_every_delay() -> None:
    token = FlakyToken(4)
    with pytest.raises(p11.GeneralError):
        log_in(token, "1234", delays=(0, 0, 0))
    assert token.calls == 4


@pytest.mark.parametrize("error", [p11.PinIncorrect, p11.PinLocked, p11.TokenNotPresent])
def test_any_other_refusal_is_raised_at_once(error: type[p11.PKCS11Error]) -> None:
    token = FlakyToken(1, error)
    with pytest.raises(error):
        log_in(token, "1234", delays=(0, 0, 0))
    assert token.calls == 1


class ShyModule:
    """A module whose first ``misses`` scans do not show the token (``error``); ``rescans`` counts
    re-initialisations."""

    so = "/nonexistent/libshy.so"

    def __init__(self, misses: int, error: type[p11.PKCS11Error] = p11.NoSuchToken) -> None:
        self.misses, self.error, self.scans, self.rescans = misses, error, 0, 0

    def get_token(self, token_label: str) -> str:
        self.scans += 1
        if self.scans <= self.misses:
            raise self.error()
        return f"token {token_label}"

    def reinitialize(self) -> None:
        self.rescans += 1


@pytest.mark.parametrize("error", [p11.NoSuchToken, p11.GeneralError])
@pytest.mark.parametrize("misses", [0, 1, 3])
def test_a_token_missing_from_a_scan_is_found_in_a_fresh_one(misses: int, error: type[p11.PKCS11Error]) -> None:
    module = ShyModule(misses, error)
    assert find_token(module, "site-a", delays=(0, 0, 0)) == "token site-a"
    assert module.rescans == misses


def test_a_token_missing_from_every_scan_is_not_found() -> None:
    module = ShyModule(4)
    with pytest.raises(p11.NoSuchToken):
        find_token(module, "site-a", delays=(0, 0, 0))
    assert module.rescans == 3


def test_no_rescan_while_a_key_holder_of_this_process_has_the_module_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(holder_module._sessions, (ShyModule.so, "site-b"), object())  # type: ignore[arg-type]
    module = ShyModule(1)
    with pytest.raises(p11.NoSuchToken):
        find_token(module, "site-a", delays=(0, 0, 0))
    assert module.rescans == 0
