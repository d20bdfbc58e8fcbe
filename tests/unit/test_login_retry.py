"""A login that fails with CKR_GENERAL_ERROR (SoftHSM2's token files being rewritten by another
process) is tried again a few times; a refused PIN never is."""

from __future__ import annotations

import pytest
from pkcs11 import exceptions as p11

from iscl_hsm.keyholder.pkcs11 import log_in


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


@pytest.mark.parametrize("failures", [0, 1, 3])
def test_a_general_error_at_login_is_tried_again(failures: int) -> None:
    token = FlakyToken(failures)
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
