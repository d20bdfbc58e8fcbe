"""The hardened profile: this project's protections, which change bytes on the wire (both ends opt in).

* Handshake MACs: PASS3 and COMPLETION carry a DES-MAC over the MD5 of every handshake frame before
  them, under a key derived from the server's challenge (docs/protocol.md §6.3).
* Record keys derived from both challenges, one cipher key and one DES-MAC key per direction; unique
  session keys also from the sender's random number (§7).
* One CBC chain per direction, so both directions may be busy at once.
* The MAC covers the message's sequence number in its direction and its length, then the message;
  zero padding; the MAC block is encrypted in the chain even with encryption none (§9).

Every derived key is parity(E_EK(block)) under a long-term encryption key EK: one INTERNAL
AUTHENTICATE on a card, one CKM_DES_ECB_ENCRYPT_DATA derivation on a token.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from .. import wire
from ..keyholder.base import KeyHolder, RecordKey
from ..wire import Mac
from .config import Config, Profile
from .profile import LinkKeys, Transcript, WireProfile, suite_of
from .record import (
    ZERO_IV,
    Chain,
    MacState,
    MessageKeys,
    RecordFormat,
    Suite,
    cbc_mac,
    same,
    xor8,
)

_PREFIX = struct.Struct(">II")


def finished_block(rs: bytes) -> bytes:
    """The block whose derivation under encryption key N gives the handshake-MAC key: RS ^ "ISCLfini".

    It depends on the server's challenge only, so each end can derive it while the other is busy
    (the server after pass 1, the client after pass 2); the MACs cover both challenges anyway.
    """
    return xor8(rs, wire.LABEL_FINISHED)


class Md5Transcript(Transcript):
    """MD5 of every handshake frame, as it was on the wire."""

    def __init__(self) -> None:
        self._md5 = hashlib.md5()
        self._before_last = self._md5

    def sent(self, frame: bytes) -> None:
        self._md5.update(frame)

    def received(self, frame: bytes) -> None:
        self._before_last = self._md5.copy()
        self._md5.update(frame)

    def digest(self, *, before_last_received: bool = False) -> bytes:
        return (self._before_last if before_last_received else self._md5).digest()


class HardenedKeys(LinkKeys):
    """Keys derived from the two challenges (and per message from the sender's random number).

    A record key is parity(E_KE(RS ^ RC ^ R ^ LABEL)) under encryption key KE. Connection keys (key
    id 1..8, R = 0) are derived once and cached; unique session keys (0x10) use encryption key number
    ``pair_id`` (the key pair chosen for authentication) and the sender's random number R. The
    handshake-MAC key is parity(E_EK[pair](RS ^ "ISCLfini")).
    """

    def __init__(self, holder: KeyHolder, suite: Suite, pair_id: int, rs: bytes, *, client: bool) -> None:
        super().__init__(holder, suite, pair_id, rs, client=client)
        self._needs_keys = suite.encryption is not wire.Encryption.NONE or suite.mac is not Mac.NONE
        self._fin_key: RecordKey | None = None
        self._cache: dict[bool, MessageKeys] = {}  # connection keys, by "client to server"

    # --- the handshake MACs -------------------------------------------------------------------

    def proof(self, label: bytes, transcript: bytes) -> bytes:
        """DES-MAC under the handshake-MAC key of label || MD5(transcript)."""
        return cbc_mac(self._finished_key(), label + transcript)

    def _finished_key(self) -> RecordKey:
        if self._fin_key is None:
            self._fin_key = self.holder.derive_key(self.pair_id, finished_block(self.rs))
        return self._fin_key

    def require(self) -> None:
        """Nothing: a missing encryption key is reported by the first message (NAK 103)."""

    # --- deriving ahead -----------------------------------------------------------------------

    def ahead(self) -> None:
        """The handshake-MAC key and a fixed-key link's record keys, in as few key-holder calls as can be.

        Run by prepare() while the peer is busy: they depend only on the challenges, and they are
        used only once the handshake has verified them. Keys under the same encryption key (the
        default: key 1 authenticates and encrypts) come from one call.
        """
        blocks = self._link_blocks()
        if self._fin_key is None and blocks and self.suite.key_id == self.pair_id:
            first, *rest = self.holder.derive_keys(self.pair_id, [finished_block(self.rs), *blocks])
            self._fin_key = first
            self._store(rest)
            return
        self._finished_key()
        if blocks:
            self._store(self.holder.derive_keys(self.suite.key_id, blocks))

    def ahead_pending(self) -> bool:
        return self._fin_key is None or bool(self._link_blocks())

    def _link_blocks(self) -> list[bytes]:
        """The derivation blocks a fixed-key link still needs, both directions (client to server first).

        None when the suite needs no keys, uses unique session keys, the client challenge is not known
        yet, or the keys are derived already.
        """
        if not self._needs_keys or self.suite.session_keys or not self.rc or self._cache:
            return []
        return [*self._blocks(True, ZERO_IV), *self._blocks(False, ZERO_IV)]

    def _store(self, keys: Sequence[RecordKey]) -> None:
        """Cache the keys :meth:`_link_blocks` derived, in the same order."""
        half = len(keys) // 2
        self._cache[True] = _message_keys(keys[:half])
        self._cache[False] = _message_keys(keys[half:])

    def _blocks(self, c2s: bool, random: bytes) -> list[bytes]:
        """One direction's blocks: the cipher key's, then (DES-MAC only) the MAC key's."""
        seed = xor8(self.rs, self.rc, random)
        enc_label, mac_label = (
            (wire.LABEL_ENC_C2S, wire.LABEL_MAC_C2S) if c2s else (wire.LABEL_ENC_S2C, wire.LABEL_MAC_S2C)
        )
        blocks = [xor8(seed, enc_label)]
        if self.suite.mac is Mac.DES_MAC:
            blocks.append(xor8(seed, mac_label))
        return blocks

    # --- record keys --------------------------------------------------------------------------

    def keys(self, outbound: bool, random: bytes | None) -> MessageKeys | None:
        if not self._needs_keys:
            return None
        client_to_server = outbound == self.client
        if self.suite.session_keys:
            assert random is not None
            blocks = self._blocks(client_to_server, random)
            return _message_keys(self.holder.derive_keys(self.pair_id, blocks))
        if blocks := self._link_blocks():
            self._store(self.holder.derive_keys(self.suite.key_id, blocks))
        return self._cache[client_to_server]

    def holder_free(self) -> bool:
        if not self._needs_keys:
            return True
        return self.holder.host_record_keys and bool(self._cache)

    def completion_on_host(self) -> bool:
        return self._fin_key is not None and self.holder.host_record_keys and not self._link_blocks()


def _message_keys(keys: Sequence[RecordKey]) -> MessageKeys:
    return MessageKeys(keys[0], keys[1] if len(keys) > 1 else None)


class HardenedRecord(RecordFormat):
    """Zero padding; the MAC over sequence number, length and message; the MAC block always encrypted."""

    def wire_length(self, length: int) -> int:
        return length + (-length % 8) if self.encrypts else length

    def padding(self, length: int) -> bytes:
        return bytes(-length % 8)

    def padding_ok(self, padding: bytes) -> bool:
        return not any(padding)

    def new_mac(self, keys: MessageKeys | None, chain: Chain, length: int) -> MacState:
        prefix = _PREFIX.pack(chain.sequence & 0xFFFFFFFF, length)
        return MacState(self.suite.mac, keys.mac if keys else None, prefix)

    def seal_mac(self, mac: MacState, keys: MessageKeys | None, chain: Chain) -> bytes:
        digest = mac.digest()
        if not digest:
            return b""
        assert keys is not None
        return chain.encrypt(keys.cipher, digest)

    def mac_verifies(self, mac: MacState, keys: MessageKeys | None, chain: Chain, payload: bytes) -> bool:
        expected = mac.digest()
        if len(payload) != len(expected):
            return False
        if not expected:
            return True
        assert keys is not None
        return same(chain.decrypt(keys.cipher, payload), expected)


class HardenedProfile(WireProfile):
    profile = Profile.HARDENED
    layout = wire.HARDENED_LAYOUT
    half_duplex = False
    uniform_auth_failure = False

    def transcript(self) -> Transcript:
        return Md5Transcript()

    def link_keys(self, holder: KeyHolder, config: Config, pair_id: int, rs: bytes, *, client: bool) -> LinkKeys:
        return HardenedKeys(holder, suite_of(config), pair_id, rs, client=client)

    def record_format(self, config: Config) -> RecordFormat:
        return HardenedRecord(suite_of(config))

    def chains(self) -> tuple[Chain, Chain]:
        return Chain(), Chain()


HARDENED = HardenedProfile()
