"""Record protection: the CBC chain, the MAC, and the streaming sealer and opener.

The two profiles differ in padding, in what the MAC covers and in how the MAC block travels; each
supplies a :class:`RecordFormat` (iscl_hsm.engine.v100, iscl_hsm.engine.hardened) and this module
does the rest. Data blocks go through the link's CBC chain when encryption is DES-CBC; the chain
starts from a zero IV when the link is authenticated and runs on across every block of every message
and across the MAC blocks (the LEADTOOLS SDK's behaviour). Which chain (one shared, or one per
direction) is the profile's choice.

Blocks are sealed and opened one communication block at a time, so that a sender and a receiver on
two cores work in parallel on one message.
"""

from __future__ import annotations

import hashlib
import hmac
from abc import ABC, abstractmethod
from dataclasses import dataclass

from .. import wire
from ..errors import ErrorCode, RemoteProtocolError
from ..keyholder.base import Buffer, RecordKey
from ..wire import Encryption, Mac

ZERO_IV = bytes(8)


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

    @property
    def session_keys(self) -> bool:
        return self.key_id == wire.SESSION_KEYS


@dataclass(slots=True)
class MessageKeys:
    """The keys for one message in one direction.

    ``mac`` is the DES-MAC key (DES-MAC only). ``random`` is the random number R that V1.00's
    "encrypt the random number" MD5 order encrypts under ``cipher``.
    """

    cipher: RecordKey
    mac: RecordKey | None
    random: bytes = ZERO_IV


class Chain:
    """A CBC chain: the IV carries over from message to message.

    ``sequence`` counts the messages it carried (the hardened MAC covers it); ``moves`` counts every
    use, so that a sealer working ahead on a :meth:`copy` can tell whether the chain moved meanwhile.
    """

    __slots__ = ("iv", "moves", "sequence")

    def __init__(self, iv: bytes = ZERO_IV, sequence: int = 0, moves: int = 0) -> None:
        self.iv = iv
        self.sequence = sequence
        self.moves = moves

    def copy(self) -> Chain:
        """A chain that goes on from here without moving this one (for sealing ahead of an ACK)."""
        return Chain(self.iv, self.sequence, self.moves)

    def adopt(self, other: Chain) -> None:
        """Take over where ``other`` (a copy of this chain) has got to."""
        self.iv, self.sequence, self.moves = other.iv, other.sequence, other.moves

    def encrypt(self, key: RecordKey, data: Buffer) -> bytes:
        out = key.encrypt_cbc(self.iv, data)
        if out:
            self.iv = out[-8:]
            self.moves += 1
        return out

    def decrypt(self, key: RecordKey, data: Buffer) -> bytes:
        out = key.decrypt_cbc(self.iv, data)
        if data:
            self.iv = bytes(data[-8:])
            self.moves += 1
        return out


class MacState:
    """Streaming MAC over ``prefix`` and a message: MD5, or DES-MAC kept as a running CBC value."""

    def __init__(self, mac: Mac, key: RecordKey | None, prefix: bytes = b"") -> None:
        self._key = key if mac is Mac.DES_MAC else None
        self._md5 = hashlib.md5(prefix) if mac is Mac.MD5 else None
        self._cbc = ZERO_IV
        if self._key is not None and prefix:
            self._cbc = self._key.encrypt_cbc(ZERO_IV, pad_zero(prefix))[-8:]
        self._empty = not prefix

    def update(self, chunk: Buffer) -> None:
        """Add a chunk; every chunk but the last is a multiple of 8 bytes."""
        if self._md5 is not None:
            self._md5.update(chunk)
        elif self._key is not None and chunk:
            self._cbc = self._key.encrypt_cbc(self._cbc, pad_zero(chunk))[-8:]
            self._empty = False

    def digest(self, suffix: bytes = b"") -> bytes:
        """The MAC of what was added; an MD5 can take a ``suffix`` first (the state is unchanged)."""
        if self._md5 is not None:
            if not suffix:
                return self._md5.digest()
            md5 = self._md5.copy()
            md5.update(suffix)
            return md5.digest()
        if self._key is None:
            return b""
        if self._empty:  # ISO/IEC 9797-1 method 1: empty input is one block of zeros
            return self._key.encrypt_cbc(ZERO_IV, bytes(8))
        return self._cbc


class RecordFormat(ABC):
    """How one profile pads, MACs and sends the MAC of one link's messages (one suite per link)."""

    def __init__(self, suite: Suite) -> None:
        self.suite = suite
        self.encrypts = suite.encryption is Encryption.DES_CBC

    @abstractmethod
    def wire_length(self, length: int) -> int:
        """Bytes of data blocks on the wire for a message of ``length`` bytes."""

    @abstractmethod
    def padding(self, length: int) -> bytes:
        """What follows a ``length``-byte message before encryption (DES-CBC only)."""

    @abstractmethod
    def padding_ok(self, padding: bytes) -> bool:
        """Whether received padding is what :meth:`padding` adds (checked after the MAC)."""

    @abstractmethod
    def new_mac(self, keys: MessageKeys | None, chain: Chain, length: int) -> MacState:
        """The MAC state for a message of ``length`` bytes about to move ``chain``."""

    @abstractmethod
    def seal_mac(self, mac: MacState, keys: MessageKeys | None, chain: Chain) -> bytes:
        """The MAC_TRANSMISSION_NOTIF payload of a message whose data went into ``mac``."""

    @abstractmethod
    def mac_verifies(self, mac: MacState, keys: MessageKeys | None, chain: Chain, payload: bytes) -> bool:
        """Whether a received MAC_TRANSMISSION_NOTIF payload matches; moves the chain as the sender did."""


class Sealer:
    """Turns one outbound message into data blocks and a MAC block, a batch of blocks per call.

    A batch is one cipher call and one MAC call over several blocks (CBC over contiguous blocks is
    the same as block by block), which keeps per-call overhead off the hot path. A batch's MAC work
    waits for the next call, so the batch goes on the wire, and the receiver starts on it, before
    the sender spends that time; the MAC block comes from the call after the last batch. At a
    message's end the receiver then trails by one batch of its work less the sender's MAC of it.
    """

    def __init__(
        self, form: RecordFormat, keys: MessageKeys | None, chain: Chain, data: bytes, block: int
    ) -> None:
        self._form = form
        self._keys = keys
        self.chain = chain
        """The CBC chain this message moves (a copy of the link's while it is sealed ahead)."""
        self.moves_at_start = chain.moves
        """Where the chain stood when sealing began: sealed-ahead blocks are good only from there."""
        self._data = memoryview(data)
        self._block = block
        self._full_block_header = wire.Header(wire.MessageId.MESSAGE_TRANSMISSION_NOTIF, block).encode()
        self._offset = 0
        self._mac = form.new_mac(keys, chain, len(data))
        self._unmacked: memoryview | None = None  # the last batch, sent before its MAC work
        self._data_out = False  # every data block (padding included) is sealed
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
        if self._data_out:
            return self._mac_frame()
        end = min(len(self._data), self._offset + max_blocks * self._block)
        chunk = self._unmacked = self._data[self._offset : end]
        self._offset = end
        self._data_out = end == len(self._data)
        wire_bytes: bytes | memoryview = chunk
        if self._form.encrypts:
            assert self._keys is not None
            plain: Buffer = chunk
            if self._data_out and (padding := self._form.padding(len(self._data))):
                plain = bytes(chunk) + padding
            wire_bytes = memoryview(self.chain.encrypt(self._keys.cipher, plain))
        if not wire_bytes:  # an empty message without padding: the MAC is all there is
            return self.next_frames(max_blocks)
        parts: list[bytes | memoryview] = []
        for i in range(0, len(wire_bytes), self._block):
            piece = wire_bytes[i : i + self._block]
            header = self._full_block_header if len(piece) == self._block else (
                wire.Header(wire.MessageId.MESSAGE_TRANSMISSION_NOTIF, len(piece)).encode())
            parts += (header, piece)
        return b"".join(parts)

    def _mac_frame(self) -> bytes:
        payload = self._form.seal_mac(self._mac, self._keys, self.chain)
        self.chain.sequence += 1
        self.done = True
        return wire.frame(wire.MessageId.MAC_TRANSMISSION_NOTIF, payload)


class Opener:
    """Receives one inbound message; releases it only when its MAC verifies.

    Blocks are checked for length as they arrive and deciphered in batches (:meth:`process`), one
    cipher call and one MAC call per batch.
    """

    def __init__(
        self, form: RecordFormat, keys: MessageKeys | None, chain: Chain, length: int, block: int
    ) -> None:
        self._form = form
        self._keys = keys
        self._chain = chain
        self.length = length
        self.remaining = form.wire_length(length)
        self._block = block
        self._plain: list[bytes] = []  # verified-to-be chunks, joined once by finish()
        self._plain_length = 0
        self._pending: list[bytes | memoryview] = []
        self.backlog = 0  # bytes received but not yet deciphered
        self._mac = form.new_mac(keys, chain, length)
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
        if self._form.encrypts:
            assert self._keys is not None
            batch = self._chain.decrypt(self._keys.cipher, batch)
        if self.remaining == 0:
            keep = self.length - self._plain_length
            self._padding = batch[keep:]
            batch = batch[:keep]
        self._plain.append(batch)
        self._plain_length += len(batch)
        self._mac.update(batch)

    def finish(self, mac_payload: bytes) -> bytes:
        """Check the MAC block and return the whole message; any failure is one uniform error."""
        self.process()
        verified = self._form.mac_verifies(self._mac, self._keys, self._chain, mac_payload)
        self._chain.sequence += 1
        if not verified:
            raise integrity_failure()
        if not self._form.padding_ok(self._padding):
            raise RemoteProtocolError(
                ErrorCode.DECRYPT, "the padding of a message could not be cleared; the link was dropped"
            )
        return b"".join(self._plain)


def integrity_failure() -> RemoteProtocolError:
    """The one error every failed MAC check raises, whatever the cause."""
    return RemoteProtocolError(
        ErrorCode.BAD_MAC,
        "a message failed its integrity check (tampered, replayed, reordered or sent under another"
        " key); the link was dropped and nothing of the message was delivered",
    )


def same(a: bytes, b: bytes) -> bool:
    """Constant-time equality of two MACs."""
    return hmac.compare_digest(a, b)
