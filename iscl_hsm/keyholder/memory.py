"""A key holder whose keys sit in process memory: for fast engine tests and nothing else.

It computes exactly what a card or a token computes (the same DES operations on the same blocks), so
the engine tests exercise the real protocol; only the place the keys live differs.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable

from ..crypto.des import DesKey, fix_parity, self_test_once
from ..errors import ErrorCode, KeyHolderConfigError
from .base import KEY_INDEXES, KeyHolder, RecordKey

MAX_OUTSTANDING = 4096
"""Outstanding challenges kept per holder; the oldest is forgotten first."""


class MemoryKeyHolder(KeyHolder):
    """Keys given as bytes: ``auth`` and ``enc`` map an index 1..8 to an 8/16/24-byte key."""

    host_record_keys = True
    gives_encryption_keys = True

    def __init__(
        self,
        auth: dict[int, bytes],
        enc: dict[int, bytes],
        name: str = "memory",
        *,
        random: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        """``random`` gives the challenges (a fixed sequence replays a recorded link, tests/vectors)."""
        self_test_once()
        for index in (*auth, *enc):
            if index not in KEY_INDEXES:
                raise ValueError(f"key index {index} is not in 1..8")
        self._auth = {i: DesKey(k) for i, k in auth.items()}
        self._enc = {i: DesKey(k) for i, k in enc.items()}
        self._random = random
        self._outstanding: OrderedDict[tuple[int, bytes], None] = OrderedDict()
        self._lock = threading.Lock()
        self.description = f"in-memory key holder '{name}'"

    def __repr__(self) -> str:
        return f"<MemoryKeyHolder {self.description} auth={sorted(self._auth)} enc={sorted(self._enc)}>"

    def get_challenge(self, key_id: int) -> bytes:
        self._key(self._auth, "auth", key_id)
        challenge = self._random(8)
        with self._lock:
            self._outstanding[(key_id, challenge)] = None
            while len(self._outstanding) > MAX_OUTSTANDING:
                self._outstanding.popitem(last=False)
        return challenge

    def internal_authenticate(self, key_id: int, block: bytes) -> bytes:
        return self._key(self._auth, "auth", key_id).encrypt_ecb(block)

    def external_authenticate(self, key_id: int, challenge: bytes, cryptogram: bytes) -> bool:
        with self._lock:
            known = self._outstanding.pop((key_id, bytes(challenge)), 1) is None
        expected = self._key(self._auth, "auth", key_id).encrypt_ecb(challenge)
        return known and hmac.compare_digest(expected, bytes(cryptogram))

    def derive_key(self, enc_key_id: int, block: bytes) -> RecordKey:
        return DesKey(fix_parity(self._key(self._enc, "enc", enc_key_id).encrypt_ecb(block)))

    def encryption_key(self, enc_key_id: int) -> RecordKey:
        key = self._key(self._enc, "enc", enc_key_id)
        if key.size != 8:
            raise KeyHolderConfigError(
                f"encryption key {enc_key_id} of {self.description} is triple DES; V1.00 uses keys 1..8"
                " as single-DES keys", ErrorCode.KEY_NOT_FOUND,
            )
        return key

    def _key(self, keys: dict[int, DesKey], purpose: str, index: int) -> DesKey:
        try:
            return keys[index]
        except KeyError:
            raise KeyHolderConfigError(
                f"{self.description} has no {purpose} key {index}", ErrorCode.KEY_NOT_FOUND
            ) from None
