"""The key-holder interface: the only door between the protocol engine and the keys.

A key holder is a PKCS#11 token, an IC card or (for unit tests) process memory. Every keyed
computation of the ISCL handshake is defined as something an ISO 7816-4 card can do, so that a card
at one end and a token at the other compute identical bytes:

* ``get_challenge``          GET CHALLENGE (INS 84): eight random bytes, remembered as outstanding.
* ``internal_authenticate``  INTERNAL AUTHENTICATE (INS 88): ECB encryption of one host-built block
                             under authentication key *n*.
* ``external_authenticate``  EXTERNAL AUTHENTICATE (INS 82): check a peer's cryptogram against one of
                             our own outstanding challenges, once only.
* ``derive_key``             INTERNAL AUTHENTICATE under encryption key *n* of a host-built block, the
                             result parity-adjusted into a single-DES record key.
* ``derive_keys``            the same for several blocks at once (a token does them in one call).
* ``encryption_key``         encryption key *n* itself as a record key: the V1.00 profile uses keys
                             1..8 as they are. A card never gives it out; a token only where the
                             security officer's policy lets it be used so (docs/protocol.md).

Implementations must be safe to call from several threads (one link per thread).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol

from ..errors import ErrorCode, KeyHolderError

Buffer = bytes | bytearray | memoryview
"""What record keys accept as data: the engine passes views to avoid copies."""

KEY_INDEXES = range(1, 9)
"""Key ids 1..8, from the public record (SetMutualAuthKeyISCL / SetEncryptKeyISCL)."""


class RecordKey(Protocol):
    """A single-DES key that protects records; it may live in host memory or inside a token."""

    in_process: bool
    """True when the key computes in this process (no token or card call per record)."""

    def encrypt_cbc(self, iv: bytes, data: Buffer) -> bytes:
        """DES-CBC encrypt ``data`` (a multiple of 8 bytes) from ``iv``; no padding."""
        ...

    def decrypt_cbc(self, iv: bytes, data: Buffer) -> bytes:
        """DES-CBC decrypt ``data`` (a multiple of 8 bytes) from ``iv``; no padding."""
        ...


class KeyHolder(ABC):
    """Challenges, responses and key derivation for one set of keys (indexes 1..8)."""

    #: Short human description used in error messages, e.g. ``SoftHSM2 token 'iscl-demo'``.
    description: str = "key holder"
    #: True when the keys ``derive_key`` returns compute in this process (no token or card call per
    #: record), so a transport may run record protection on its event loop.
    host_record_keys: bool = False
    #: True when ``encryption_key`` can give encryption keys themselves (V1.00 with key ids 1..8); an
    #: IC card never can.
    gives_encryption_keys: bool = False

    @abstractmethod
    def get_challenge(self, key_id: int) -> bytes:
        """Return 8 fresh random bytes and remember them as an outstanding challenge for ``key_id``."""

    @abstractmethod
    def internal_authenticate(self, key_id: int, block: bytes) -> bytes:
        """Return E_K(block) under authentication key ``key_id`` (8 bytes in, 8 bytes out)."""

    @abstractmethod
    def external_authenticate(self, key_id: int, challenge: bytes, cryptogram: bytes) -> bool:
        """Check ``cryptogram == E_K(challenge)`` under authentication key ``key_id``.

        ``challenge`` must be one this holder issued and has not yet consumed; it is consumed by the
        call whatever the outcome, so a replayed cryptogram fails. The comparison is constant-time.
        """

    def expect_response(self, key_id: int, challenge: bytes) -> None:
        """Work out now, while the peer is busy, what ``external_authenticate`` will compare with.

        Only an optimisation (the default does nothing): the challenge stays outstanding and is
        still consumed, and checked in constant time, by ``external_authenticate``.
        """

    @abstractmethod
    def derive_key(self, enc_key_id: int, block: bytes) -> RecordKey:
        """Return the DES key parity(E_KE(block)) under encryption key ``enc_key_id``."""

    def derive_keys(self, enc_key_id: int, blocks: Sequence[bytes]) -> list[RecordKey]:
        """``derive_key`` of each block, in order; a token overrides this to make one call of it all."""
        return [self.derive_key(enc_key_id, block) for block in blocks]

    def encryption_key(self, enc_key_id: int) -> RecordKey:
        """Encryption key ``enc_key_id`` itself, as the single-DES record key of a V1.00 link.

        Raises KeyHolderError (with what to do instead) where the key cannot be used so.
        """
        raise KeyHolderError(
            f"{self.description} cannot use encryption key {enc_key_id} itself as a DES key, which V1.00"
            " links with encryption key ids 1..8 need: use unique session keys (--enc-key-id session)"
            " or the hardened profile (--profile hardened)",
            ErrorCode.BAD_OPTION,
        )

    def close(self) -> None:
        """Release sessions, card connections and the like."""
