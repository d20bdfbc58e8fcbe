"""Link settings. Both ends must agree on algorithms and limits; a mismatch is refused with NAK."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .. import wire
from ..keyholder.base import KEY_INDEXES
from ..wire import Encryption, Mac


class Role(Enum):
    CLIENT = "client"  # the TCP initiator
    SERVER = "server"  # the TCP acceptor


@dataclass(frozen=True)
class Config:
    """What this end proposes and accepts. Defaults: auth key 1, DES-CBC with DES-MAC, enc key 1."""

    auth_key_id: int = 1
    allowed_auth_key_ids: frozenset[int] = field(default_factory=lambda: frozenset(KEY_INDEXES))
    enc_key_id: int = 1
    encryption: Encryption = Encryption.DES_CBC
    mac: Mac = Mac.DES_MAC
    max_block: int = wire.MAX_BLOCK
    max_message: int = wire.DEFAULT_MAX_MESSAGE
    auth_data: bytes = b"iscl-hsm"
    through_mode: bool = False
    accept_close: bool = True

    def __post_init__(self) -> None:
        if self.auth_key_id not in KEY_INDEXES:
            raise ValueError(f"authentication key id {self.auth_key_id} is not in 1..8")
        if not self.allowed_auth_key_ids <= frozenset(KEY_INDEXES):
            raise ValueError("allowed authentication key ids must be in 1..8")
        if self.enc_key_id not in KEY_INDEXES and self.enc_key_id != wire.SESSION_KEYS:
            raise ValueError(f"encryption key id {self.enc_key_id} is not in 1..8 or 0x10 (session keys)")
        if not (wire.MIN_BLOCK <= self.max_block <= wire.MAX_BLOCK and self.max_block % 8 == 0):
            raise ValueError(
                f"block length {self.max_block} must be a multiple of 8 between"
                f" {wire.MIN_BLOCK} and {wire.MAX_BLOCK}"
            )
        if not 0 <= self.max_message <= 0xFFFFFFFF:
            raise ValueError("maximum message length must fit in 32 bits")
        if not 1 <= len(self.auth_data) <= wire.MAX_AUTH_DATA:
            raise ValueError(f"authentication data must be 1..{wire.MAX_AUTH_DATA} bytes")
        object.__setattr__(self, "encryption", Encryption(self.encryption))
        object.__setattr__(self, "mac", Mac(self.mac))
        object.__setattr__(self, "allowed_auth_key_ids", frozenset(self.allowed_auth_key_ids))
