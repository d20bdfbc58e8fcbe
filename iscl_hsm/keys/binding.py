"""Binding a wrapped-key file to the transport key, so that none of its fields can be edited.

A transport key can only WRAP and UNWRAP (it is not modifiable, so it cannot be given SIGN later),
and the key it wraps says nothing about which role it was exported from. So the exporting token
makes a *one-time MAC key* for each document: a 256-bit CKK_GENERIC_SECRET session object that may
only SIGN (HMAC-SHA256), sensitive, extractable. It signs the document's canonical form inside the
token, is wrapped under the transport key with the same mechanism as the key (CKM_AES_KEY_WRAP_PAD),
and is destroyed. The document then carries ``binding`` (mechanism and the wrapped MAC key) and
``mac``.

The importing token unwraps the MAC key as a session object that may only VERIFY, and checks the MAC
before it unwraps anything else. Without the transport key, nobody can make a wrapped MAC key that
unwraps (RFC 5649 checks its integrity), nor learn one that does, so any edit of any field (purpose,
index, version, KCV, the wrapped bytes, the wrapped MAC key itself) is refused. The MAC covers the
canonical JSON of the whole document less ``mac``: keys sorted, no spaces, ASCII. This protects the
file between the sites; someone who holds the user PIN of a token with the transport key can unwrap
what it wraps in any role anyway, which is why that PIN stays with the security officer.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Final

from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11

from iscl_hsm.errors import ErrorCode, KeyHolderError

__all__ = [
    "BINDING_MECHANISM",
    "MAC_LENGTH",
    "UNWRAP_FAILURES",
    "bind",
    "canonical",
    "check_binding_fields",
    "verify",
]

BINDING_MECHANISM: Final = "CKM_SHA256_HMAC"
MAC_LENGTH: Final = 32
_MAC_KEY_BITS: Final = 256
_WRAP: Final = Mechanism.AES_KEY_WRAP_PAD
UNWRAP_FAILURES: Final = (
    p11.GeneralError,
    p11.EncryptedDataInvalid,
    p11.EncryptedDataLenRange,
    p11.WrappedKeyInvalid,
    p11.WrappedKeyLenRange,
    p11.FunctionFailed,
)
"""How tokens report wrapped bytes that do not unwrap (SoftHSM2: CKR_GENERAL_ERROR)."""


def canonical(document: dict[str, Any]) -> bytes:
    """What the MAC covers: the document less ``mac``, as JSON with sorted keys and no spaces."""
    body = {k: v for k, v in document.items() if k != "mac"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def bind(session: Any, transport: Any, document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with ``binding`` and ``mac`` added: MACed under a one-time key wrapped by ``transport``."""
    mac_key = session.generate_key(
        KeyType.GENERIC_SECRET,
        _MAC_KEY_BITS,
        store=False,
        capabilities=MechanismFlag.SIGN,
        template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True},
    )
    try:
        bound = {
            **document,
            "binding": {
                "mechanism": BINDING_MECHANISM,
                "wrapped_mac_key": bytes(transport.wrap_key(mac_key, mechanism=_WRAP)).hex(),
            },
        }
        bound["mac"] = bytes(mac_key.sign(canonical(bound), mechanism=Mechanism.SHA256_HMAC)).hex()
    finally:
        with contextlib.suppress(p11.PKCS11Error):
            mac_key.destroy()
    return bound


def check_binding_fields(document: dict[str, Any]) -> bool:
    """Whether ``binding`` and ``mac`` are there and well formed (not whether they verify)."""
    try:
        binding = document["binding"]
        return (
            binding["mechanism"] == BINDING_MECHANISM
            and len(bytes.fromhex(binding["wrapped_mac_key"])) >= 16
            and len(bytes.fromhex(document["mac"])) == MAC_LENGTH
        )
    except (KeyError, TypeError, ValueError):
        return False


def verify(transport: Any, transport_name: str, document: dict[str, Any], altered: str, remedy: str) -> None:
    """Refuse ``document`` unless its MAC verifies under the MAC key ``transport`` unwraps.

    The refusal is ``altered`` ("the file was altered after export"), why, and ``remedy``;
    ``transport_name`` names the transport key. The caller has run :func:`check_binding_fields`.
    """
    try:
        mac_key = transport.unwrap_key(
            ObjectClass.SECRET_KEY,
            KeyType.GENERIC_SECRET,
            bytes.fromhex(document["binding"]["wrapped_mac_key"]),
            mechanism=_WRAP,
            store=False,
            capabilities=MechanismFlag.VERIFY,
            template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: False},
        )
    except UNWRAP_FAILURES:
        raise KeyHolderError(
            f"{altered}: its MAC key does not unwrap under {transport_name}, so it was changed, or wrapped"
            f" under another transport key with the same KCV; {remedy}",
            ErrorCode.BAD_KEY_FILE,
        ) from None
    try:
        valid = mac_key.verify(
            canonical(document), bytes.fromhex(document["mac"]), mechanism=Mechanism.SHA256_HMAC
        )
    finally:
        with contextlib.suppress(p11.PKCS11Error):
            mac_key.destroy()
    if not valid:
        raise KeyHolderError(
            f"{altered}: its fields do not match the MAC made under {transport_name} when it was written;"
            f" {remedy}",
            ErrorCode.BAD_KEY_FILE,
        )
