"""Record protection: keys, the CBC chain, the MAC, and the streaming sealer and opener.

Theory (docs/protocol.md, "Message transfer"): each direction has its own keys and its own CBC chain.
The chain starts from a zero IV when the link is authenticated and continues across every block of
every message and across the MAC blocks (the LEADTOOLS SDK's behaviour). Data blocks go through the
chain when encryption is DES-CBC; the MAC always does, so even with encryption "none" the MD5 digest
is "MD5 encrypted with DES" (DICOM PS3.15 B.2). The MAC covers an 8-byte prefix, the message's
sequence number in its direction and its length, then the message: replayed, reordered, dropped or
truncated messages fail it.

Blocks are sealed and opened one communication block at a time, so that a sender and a receiver on
two cores work in parallel on one message.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .. import wire
from ..errors import ErrorCode, RemoteProtocolError
from ..keyholder.base import Buffer, KeyHolder, RecordKey
from ..wire import Encryption, Mac

ZERO_IV = bytes(8)
_PREFIX = struct.Struct(">II")


def xor8(*blocks: bytes) -> bytes:
    """XOR of 8-byte blocks."""
    acc = 0
    for b in blocks:
        acc ^= int.from_bytes(b, "big")
    return acc.to_bytes(8, "big")


def pad_zero(data: Buffer) -> Buffer:
    """ISO/IEC 9797-1 padding method 1: zero bytes up to a multiple of 8 (nothing if aligned)."""
    n = -len(data) % 8
    return bytes(data) + bytes(n) if n else data


def cbc_mac(key: RecordKey, data: Buffer) -> bytes:
    """ISO/IEC 9797-1 MAC algorithm 1 (DES-MAC, ANSI X9.9): last block of CBC from a zero IV."""
    padded = pad_zero(data) if data else bytes(8)
    return key.encrypt_cbc(ZERO_IV, padded)[-8:]


@dataclass(frozen=True, slots=True)
class Suite:
    """How one message is protected, as named in MESSAGE_TRANSMISSION_RQ."""

    encryption: Encryption
    key_id: int
    mac: Mac

    def wire_length(self, length: int) -> int:
        """Bytes of data blocks on the wire for a message of ``length`` bytes."""
        return length + (-length % 8) if self.encryption is Encryption.DES_CBC else length

    @property
    def needs_keys(self) -> bool:
        return self.encryption is not Encryption.NONE or self.mac is not Mac.NONE


@dataclass(slots=True)
class MessageKeys:
    """The keys for one message in one direction (the MAC key only for DES-MAC)."""

    cipher: RecordKey
    mac: RecordKey | None


def finished_block(rs: bytes) -> bytes:
    """The block whose derivation under encryption key N gives the handshake-MAC key: RS ^ "ISCLfini".

    It depends on the server's challenge only, so each end can derive it while the other is busy
    (the server after pass 1, the client after pass 2); the MACs cover both challenges anyway.
    """
    return xor8(rs, wire.LABEL_FINISHED)


class KeySchedule:
    """Derives the keys of one authenticated link from the two challenges.

    A key is parity(E_KE(RS ^ RC ^ R ^ LABEL)) under encryption key KE, computed by the key holder
    (INTERNAL AUTHENTICATE on a card, CKM_DES_ECB_ENCRYPT_DATA on a token). Connection keys (key id
    1..8, R = 0) are derived once and cached; unique session keys (0x10) use encryption key number
    ``pair_id`` (the key pair chosen for authentication) and the sender's random number R.
    """

    def __init__(self, holder: KeyHolder, pair_id: int, rs: bytes, rc: bytes, client: bool) -> None:
        self._holder = holder
        self._pair_id = pair_id
        self._base = xor8(rs, rc)
        self._client = client
        self._cache: dict[tuple[bool, int], MessageKeys] = {}

    def keys(self, outbound: bool, suite: Suite, random: bytes | None) -> MessageKeys:
        """Keys for one message; ``random`` is R for unique session keys, else None."""
        client_to_server = outbound == self._client
        if suite.key_id == wire.SESSION_KEYS:
            assert random is not None
            blocks = self._blocks(client_to_server, suite.mac, random)
            return self._message_keys(self._holder.derive_keys(self._pair_id, blocks))
        if blocks := self.link_blocks(suite):  # a link's suite never changes, nor what it needs
            self.store(suite, self._holder.derive_keys(suite.key_id, blocks))
        return self._cache[client_to_server, suite.key_id]

    def derived(self, suite: Suite) -> bool:
        """True when no message under ``suite`` needs the key holder any more (keys cached both ways)."""
        if suite.key_id == wire.SESSION_KEYS:
            return False
        return (True, suite.key_id) in self._cache and (False, suite.key_id) in self._cache

    def link_blocks(self, suite: Suite) -> list[bytes]:
        """The derivation blocks a fixed-key link still needs, both directions (client to server first).

        None when the suite needs no keys, uses unique session keys, or has them derived already.
        """
        if not suite.needs_keys or suite.key_id == wire.SESSION_KEYS or self.derived(suite):
            return []
        return [*self._blocks(True, suite.mac, ZERO_IV), *self._blocks(False, suite.mac, ZERO_IV)]

    def store(self, suite: Suite, keys: Sequence[RecordKey]) -> None:
        """Cache the keys :meth:`link_blocks` derived, in the same order."""
        half = len(keys) // 2
        self._cache[True, suite.key_id] = self._message_keys(keys[:half])
        self._cache[False, suite.key_id] = self._message_keys(keys[half:])

    def _blocks(self, c2s: bool, mac: Mac, random: bytes) -> list[bytes]:
        """One direction's blocks: the cipher key's, then (DES-MAC only) the MAC key's."""
        seed = xor8(self._base, random)
        enc_label, mac_label = (
            (wire.LABEL_ENC_C2S, wire.LABEL_MAC_C2S) if c2s else (wire.LABEL_ENC_S2C, wire.LABEL_MAC_S2C)
        )
        blocks = [xor8(seed, enc_label)]
        if mac is Mac.DES_MAC:
            blocks.append(xor8(seed, mac_label))
        return blocks

    @staticmethod
    def _message_keys(keys: Sequence[RecordKey]) -> MessageKeys:
        return MessageKeys(keys[0], keys[1] if len(keys) > 1 else None)


class Chain:
    """One direction's CBC chain: the IV carries over from message to message."""

    def __init__(self, iv: bytes = ZERO_IV, sequence: int = 0) -> None:
        self.iv = iv
        self.sequence = sequence

    def copy(self) -> Chain:
        """A chain that goes on from here without moving this one (for sealing ahead of an ACK)."""
        return Chain(self.iv, self.sequence)

    def encrypt(self, key: RecordKey, data: Buffer) -> bytes:
        out = key.encrypt_cbc(self.iv, data)
        if out:
            self.iv = out[-8:]
        return out

    def decrypt(self, key: RecordKey, data: Buffer) -> bytes:
        out = key.decrypt_cbc(self.iv, data)
        if data:
            self.iv = bytes(data[-8:])
        return out


class _MacState:
    """Streaming MAC over prefix || message: MD5, or DES-MAC kept as a running CBC value."""

    def __init__(self, mac: Mac, key: RecordKey | None, prefix: bytes) -> None:
        self._key = key if mac is Mac.DES_MAC else None
        self._md5 = hashlib.md5(prefix) if mac is Mac.MD5 else None
        self._cbc = self._key.encrypt_cbc(ZERO_IV, prefix)[-8:] if self._key is not None else ZERO_IV

    def update(self, chunk: Buffer) -> None:
        """Add a chunk; every chunk but the last is a multiple of 8 bytes."""
        if self._md5 is not None:
            self._md5.update(chunk)
        elif self._key is not None and chunk:
            self._cbc = self._key.encrypt_cbc(self._cbc, pad_zero(chunk))[-8:]

    def digest(self) -> bytes:
        if self._md5 is not None:
            return self._md5.digest()
        return self._cbc if self._key is not None else b""


def _prefix(sequence: int, length: int) -> bytes:
    return _PREFIX.pack(sequence & 0xFFFFFFFF, length)


class Sealer:
    """Turns one outbound message into data blocks and a MAC block, a batch of blocks per call.

    A batch is one cipher call and one MAC call over several blocks (CBC over contiguous blocks is
    the same as block by block), which keeps per-call overhead off the hot path. A batch's MAC work
    waits for the next call, so the batch goes on the wire, and the receiver starts on it, before
    the sender spends that time; the MAC block comes from the call after the last batch. At a
    message's end the receiver then trails by one batch of its work less the sender's MAC of it.
    """

    def __init__(
        self, suite: Suite, keys: MessageKeys | None, chain: Chain, data: bytes, block: int
    ) -> None:
        self._suite = suite
        self._keys = keys
        self.chain = chain
        """The CBC chain this message moves (a copy of the link's while it is sealed ahead)."""
        self._data = memoryview(data)
        self._block = block
        self._full_block_header = wire.Header(wire.MessageId.MESSAGE_TRANSMISSION_NOTIF, block).encode()
        self._offset = 0
        self._mac = _MacState(suite.mac, keys.mac if keys else None, _prefix(chain.sequence, len(data)))
        self._unmacked: memoryview | None = None  # the last batch, sent before its MAC work
        self.done = False

    @property
    def offset(self) -> int:
        """Bytes of the message sealed so far."""
        return self._offset

    def next_frames(self, max_blocks: int) -> bytes:
        """Up to ``max_blocks`` MESSAGE_TRANSMISSION_NOTIFs; after the last, the MAC_TRANSMISSION_NOTIF."""
        if self._unmacked is not None:
            self._mac.update(self._unmacked)
            self._unmacked = None
        if self._offset >= len(self._data):
            return self._mac_frame()
        end = min(len(self._data), self._offset + max_blocks * self._block)
        chunk = self._unmacked = self._data[self._offset : end]
        self._offset = end
        wire_bytes: bytes | memoryview = chunk
        if self._suite.encryption is Encryption.DES_CBC:
            assert self._keys is not None
            wire_bytes = memoryview(self.chain.encrypt(self._keys.cipher, pad_zero(chunk)))
        parts: list[bytes | memoryview] = []
        for i in range(0, len(wire_bytes), self._block):
            piece = wire_bytes[i : i + self._block]
            header = self._full_block_header if len(piece) == self._block else (
                wire.Header(wire.MessageId.MESSAGE_TRANSMISSION_NOTIF, len(piece)).encode())
            parts += (header, piece)
        return b"".join(parts)

    def _mac_frame(self) -> bytes:
        mac = self._mac.digest()
        if mac:
            assert self._keys is not None
            mac = self.chain.encrypt(self._keys.cipher, mac)
        self.chain.sequence += 1
        self.done = True
        return wire.frame(wire.MessageId.MAC_TRANSMISSION_NOTIF, mac)


class Opener:
    """Receives one inbound message; releases it only when its MAC verifies.

    Blocks are checked for length as they arrive and deciphered in batches (:meth:`process`), one
    cipher call and one MAC call per batch.
    """

    def __init__(
        self, suite: Suite, keys: MessageKeys | None, chain: Chain, length: int, block: int
    ) -> None:
        self._suite = suite
        self._keys = keys
        self._chain = chain
        self.length = length
        self.remaining = suite.wire_length(length)
        self._block = block
        self._plain: list[bytes] = []  # verified-to-be chunks, joined once by finish()
        self._plain_length = 0
        self._pending: list[bytes | memoryview] = []
        self.backlog = 0  # bytes received but not yet deciphered
        self._mac = _MacState(suite.mac, keys.mac if keys else None, _prefix(chain.sequence, length))
        self._padding = b""

    @property
    def complete(self) -> bool:
        return self.remaining == 0

    def add_block(self, payload: bytes | memoryview) -> None:
        """Check a block's length and keep it; a view must be followed by :meth:`process`."""
        n = len(payload)
        if n == 0 or n > self.remaining or (n != self.remaining and n != self._block):
            raise RemoteProtocolError(
                ErrorCode.BAD_BLOCK_LENGTH,
                f"the peer sent a data block of {n} bytes where {min(self._block, self.remaining)}"
                " were expected",
            )
        self.remaining -= n
        self._pending.append(payload)
        self.backlog += n

    def process(self) -> None:
        """Decipher and MAC the blocks received so far."""
        if not self._pending:
            return
        batch = b"".join(self._pending)
        self._pending.clear()
        self.backlog = 0
        if self._suite.encryption is Encryption.DES_CBC:
            assert self._keys is not None
            batch = self._chain.decrypt(self._keys.cipher, batch)
        if self.remaining == 0:
            keep = self.length - self._plain_length
            self._padding = batch[keep:]
            batch = batch[:keep]
        self._plain.append(batch)
        self._plain_length += len(batch)
        self._mac.update(batch)

    def finish(self, encrypted_mac: bytes) -> bytes:
        """Check the MAC block and return the whole message; any failure is one uniform error."""
        self.process()
        expected = self._mac.digest()
        if len(encrypted_mac) != len(expected):
            raise _integrity_failure()
        received = b""
        if expected:
            assert self._keys is not None
            received = self._chain.decrypt(self._keys.cipher, encrypted_mac)
        self._chain.sequence += 1
        if not hmac.compare_digest(received, expected):
            raise _integrity_failure()
        if any(self._padding):
            raise RemoteProtocolError(
                ErrorCode.DECRYPT, "the padding of a message could not be cleared; the link was dropped"
            )
        return b"".join(self._plain)


def _integrity_failure() -> RemoteProtocolError:
    return RemoteProtocolError(
        ErrorCode.BAD_MAC,
        "a message failed its integrity check (tampered, replayed, reordered or sent under another"
        " key); the link was dropped and nothing of the message was delivered",
    )
