"""Where the virtual card's keys live: in its file (:class:`FileKeys`) or in a PKCS#11 token (:class:`TokenKeys`).

The applet needs one operation from its keys, E_K(block) under the key in a slot (INTERNAL
AUTHENTICATE, and EXTERNAL AUTHENTICATE compares with it), plus storing a key for PUT KEY. The PINs,
retry counters and challenge stay in the card either way.

A card on a token does its DES work in the token through :class:`Pkcs11KeyHolder`: under an
authentication key, ``internal_authenticate``; under an encryption key, ``encrypt_blocks``, which
reads E_KE(block) out of one CKM_DES_ECB_ENCRYPT_DATA derivation, so the card answers the same bytes
as a card holding the key. Keys are loaded into the token with ``iscl keys``, never through PUT KEY.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from ..crypto.des import DesKey
from ..errors import ErrorCode, KeyHolderError
from .state import CardState

if TYPE_CHECKING:
    from ..keyholder.pkcs11 import Pkcs11KeyHolder

log = logging.getLogger(__name__)


class CardKeys(ABC):
    """The card's 16 key slots (auth-1..auth-8, enc-1..enc-8)."""

    #: True when PUT KEY may store keys here; False answers it 6A81 (function not supported).
    loads_keys: ClassVar[bool] = False
    description: str

    @abstractmethod
    def encrypt(self, purpose: str, index: int, block: bytes) -> bytes | None:
        """E_K(block), DES or triple-DES ECB, under the key in the slot; None when the slot is empty.

        Any other failure is a KeyHolderError, which the applet answers with 6F00.
        """

    def store(self, purpose: str, index: int, value: bytes) -> bytes:
        """Put ``value`` into the slot and return its KCV (only when ``loads_keys``)."""
        raise KeyHolderError(
            f"the virtual card on {self.description} does not load keys; load them with 'iscl keys' on the token"
        )


class FileKeys(CardKeys):
    """Keys in clear in the card file, next to the PINs."""

    loads_keys = True

    def __init__(self, state: CardState) -> None:
        self.state = state
        self.description = f"file {state.path}" if state.path else "memory"

    def encrypt(self, purpose: str, index: int, block: bytes) -> bytes | None:
        value = self.state.key(purpose, index)
        return None if value is None else DesKey(value).encrypt_ecb(block)

    def store(self, purpose: str, index: int, value: bytes) -> bytes:
        self.state.set_key(purpose, index, value)
        self.state.save()
        return DesKey(value).kcv


class TokenKeys(CardKeys):
    """Keys in a PKCS#11 token; ``holder`` must keep host record keys (``record_keys="host"``)."""

    def __init__(self, holder: Pkcs11KeyHolder) -> None:
        self.holder = holder
        self.description = holder.description

    def encrypt(self, purpose: str, index: int, block: bytes) -> bytes | None:
        try:
            if purpose == "auth":
                return self.holder.internal_authenticate(index, block)
            return self.holder.encrypt_blocks(index, [block])
        except KeyHolderError as exc:
            if exc.code != ErrorCode.KEY_NOT_FOUND:
                raise
            log.warning("answering 6A88 (key not found): %s", exc.args[0])
            return None
