"""Link settings. Both ends must agree on profile, algorithms and limits; a mismatch is refused with NAK."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .. import wire
from ..keyholder.base import KEY_INDEXES
from ..wire import Encryption, Mac, Md5Order


class Role(Enum):
    CLIENT = "client"  # the TCP initiator
    SERVER = "server"  # the TCP acceptor


class Profile(Enum):
    """Which wire the link speaks (docs/protocol.md, "Profiles"); both ends must choose the same.

    ``V100`` follows the public record of ISCL V1.00 to the letter, so that equipment built on the
    LEADTOOLS SDK can be reached. ``HARDENED`` adds this project's protections, which change bytes on
    the wire: keys derived from both challenges, one CBC chain per direction, sequence numbers and
    lengths under the MAC, handshake MACs over the transcript.
    """

    V100 = "v1.00"
    HARDENED = "hardened"


DEFAULT_AUTH_DATA = {Profile.V100: b"", Profile.HARDENED: b"iscl-hsm"}
"""What each profile sends as authentication data when none is configured: V1.00 sends the SDK
builders' fields only; hardened has always sent (and requires) 1..128 bytes."""


@dataclass(frozen=True)
class Config:
    """What this end proposes and accepts.

    Defaults: the V1.00 profile, auth key 1, DES-CBC with DES-MAC under encryption key 1.
    ``auth_data`` None means the profile's default (:data:`DEFAULT_AUTH_DATA`).
    """

    profile: Profile = Profile.V100
    auth_key_id: int = 1
    allowed_auth_key_ids: frozenset[int] = field(default_factory=lambda: frozenset(KEY_INDEXES))
    enc_key_id: int = 1
    encryption: Encryption = Encryption.DES_CBC
    mac: Mac = Mac.DES_MAC
    max_block: int = wire.MAX_BLOCK
    max_message: int = wire.DEFAULT_MAX_MESSAGE
    auth_data: bytes | None = None
    through_mode: bool = False
    accept_close: bool = True
    md5_order: Md5Order = Md5Order.ENCRYPT_OUTPUT
    """V1.00: how this end makes its MD5 MACs; as a receiver it checks either order (PS3.15)."""
    allow_unkeyed_md5: bool = False
    """V1.00 with encryption none and MD5: send and accept the SDK's plain, unkeyed MD5."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "profile", Profile(self.profile))
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
        if self.auth_data is None:
            object.__setattr__(self, "auth_data", DEFAULT_AUTH_DATA[self.profile])
        least = 0 if self.profile is Profile.V100 else 1
        if not least <= len(self.auth_data or b"") <= wire.MAX_AUTH_DATA:
            raise ValueError(f"authentication data must be {least}..{wire.MAX_AUTH_DATA} bytes in the {self.profile.value} profile")
        object.__setattr__(self, "encryption", Encryption(self.encryption))
        object.__setattr__(self, "mac", Mac(self.mac))
        object.__setattr__(self, "md5_order", Md5Order(self.md5_order))
        object.__setattr__(self, "allowed_auth_key_ids", frozenset(self.allowed_auth_key_ids))
        if self.sends_unkeyed_md5 and not self.allow_unkeyed_md5:
            raise ValueError(
                "V1.00 with encryption none and MD5 sends the MD5 unencrypted and unkeyed, which gives no"
                " protection against tampering: anyone on the path can change a message and its MD5."
                " Choose des-mac or des-cbc, or allow it knowingly (--allow-unkeyed-md5)"
            )

    @property
    def sends_unkeyed_md5(self) -> bool:
        """True when this end's MD5 MACs would travel as a plain digest (V1.00, encryption none)."""
        return (
            self.profile is Profile.V100
            and self.encryption is Encryption.NONE
            and self.mac is Mac.MD5
            and self.md5_order is Md5Order.ENCRYPT_OUTPUT
        )

    @property
    def own_auth_data(self) -> bytes:
        """The authentication data this end sends (the profile's default filled in)."""
        assert self.auth_data is not None
        return self.auth_data
