"""The one sentence a refused login gets, for the user PIN and the SO PIN alike."""

from __future__ import annotations

import pytest
from pkcs11 import exceptions as p11

from iscl_hsm.keyholder.pkcs11 import pin_error

TOKEN = "PKCS#11 token 'site-a' (module /usr/lib/softhsm/libsofthsm2.so)"


class SilentLibrary:
    """A module whose token reports no PIN flags (so the tries hint is the general one)."""

    def get_token(self, token_label: str) -> object:
        raise p11.TokenNotPresent()


HINT = "The token may allow only a few wrong tries before it locks the PIN"
REFUSED = "has a length or characters the token does not accept"


@pytest.mark.parametrize(
    ("error", "so", "sentence"),
    [
        (p11.PinIncorrect, False, f"wrong PIN for {TOKEN}; check the PIN or PIN file. {HINT}"),
        (p11.PinIncorrect, True, f"wrong SO PIN for {TOKEN}; check the SO PIN or its file. {HINT}"),
        (p11.PinLocked, False, f"the user PIN of {TOKEN} is locked; the security officer must unlock it"),
        (p11.PinLocked, True, f"the SO PIN of {TOKEN} is locked; the token must be initialised again"),
        (p11.PinLenRange, False, f"the PIN given for {TOKEN} {REFUSED}; check the PIN or PIN file"),
        (p11.PinInvalid, True, f"the SO PIN given for {TOKEN} {REFUSED}; check the SO PIN or its file"),
    ],
)
def test_each_pin_refusal_is_one_sentence_naming_the_token_and_what_to_do(
    error: type[p11.PKCS11Error], so: bool, sentence: str
) -> None:
    found = pin_error(error(), TOKEN, SilentLibrary(), "site-a", so=so)
    assert found is not None and found.args[0] == sentence


@pytest.mark.parametrize("error", [p11.TokenNotPresent, p11.DeviceRemoved, p11.GeneralError])
def test_other_refusals_are_left_to_the_caller(error: type[p11.PKCS11Error]) -> None:
    assert pin_error(error(), TOKEN, SilentLibrary(), "site-a") is None
