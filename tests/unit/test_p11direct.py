"""The CK_RV mapping of the direct PKCS#11 calls: the key holder's error handling relies on it."""

from __future__ import annotations

import pytest
from pkcs11 import exceptions as p11

from iscl_hsm.keyholder.p11direct import _check


def test_ok_raises_nothing() -> None:
    _check(0)


@pytest.mark.parametrize(
    ("rv", "kind"),
    [
        (0x032, p11.DeviceRemoved),
        (0x060, p11.KeyHandleInvalid),
        (0x070, p11.MechanismInvalid),
        (0x082, p11.ObjectHandleInvalid),
        (0x0B0, p11.SessionClosed),
        (0x0B3, p11.SessionHandleInvalid),
        (0x0E0, p11.TokenNotPresent),
        (0x101, p11.UserNotLoggedIn),
    ],
)
def test_codes_the_key_holder_tells_apart_raise_python_pkcs11_classes(rv: int, kind: type) -> None:
    with pytest.raises(kind, match=f"CKR 0x{rv:08X}"):
        _check(rv)


def test_any_other_code_is_a_pkcs11_error_naming_the_code() -> None:
    with pytest.raises(p11.PKCS11Error, match="CKR 0x80001234") as caught:
        _check(0x80001234)
    assert type(caught.value) is p11.PKCS11Error
