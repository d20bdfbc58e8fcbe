"""Every byte decision of ISCL V1.00, in one place.

What comes from the public record (message ids, option values, algorithm codes, sizes, the 32-byte
header of eight 32-bit fields, the version string) is marked PUBLIC below; what the record leaves open
(byte order, payload layouts, labels) is marked CHOICE and explained in docs/protocol.md.

CHOICE: every integer is an unsigned 32-bit big-endian number (network byte order, as DICOM's own
PDUs), and every payload is a fixed sequence of such integers and fixed-length byte strings, with at
most one variable-length byte string at the end, preceded by its length.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import ClassVar, Self

from .errors import ErrorCode, RemoteProtocolError

# --- PUBLIC: sizes and constants -------------------------------------------------------------

VERSION = b"MEDIS-ISCL V1.00"  # PUBLIC text; CHOICE: sent as these 16 ASCII bytes.
HEADER_SIZE = 32
MAX_BLOCK = 8160  # data bytes in one communication block (8192 with the header)
MIN_BLOCK = 8  # CHOICE: one DES block
DEFAULT_MAX_MESSAGE = 1 << 20
MAX_AUTH_DATA = 128
CHALLENGE_SIZE = 8
ACK = 0x00000000
NAK = 0xFFFFFFFF
SESSION_KEYS = 0x10  # encryption key id meaning "unique session key per message"
DEFAULT_PORT = 2761


class MessageId(IntEnum):
    """PUBLIC: message ids from the LEADTOOLS SDK headers ("values specified in the ISCL standard")."""

    LINE_CONNECTION_CHECK_RQ = 0x00110001
    LINE_CONNECTION_CHECK_RP = 0x00110003
    MUTUAL_AUTH_RQ = 0x00120001
    MUTUAL_AUTH_RP = 0x00120003
    MUTUAL_AUTH_PASS1_NOTIF = 0x00130002
    MUTUAL_AUTH_PASS2_NOTIF = 0x00140002
    MUTUAL_AUTH_PASS3_NOTIF = 0x00150002
    MUTUAL_AUTH_COMPLETION_NOTIF = 0x00160002
    MESSAGE_TRANSMISSION_RQ = 0x00200001
    MESSAGE_TRANSMISSION_RP = 0x00200003
    MESSAGE_TRANSMISSION_NOTIF = 0x00200002
    RNDNO_FOR_SESSION_KEY_RQ = 0x00210001
    RNDNO_FOR_SESSION_KEY_RP = 0x00210003
    MAC_TRANSMISSION_NOTIF = 0x00230002
    THROUGH_MODE_TRANSMISSION_NOTIF = 0x00260002
    LINE_DISCONNECTION_RQ = 0x00FF0001
    LINE_DISCONNECTION_RP = 0x00FF0003


class AuthMethod(IntEnum):
    THREE_PASS_FOUR_WAY = 0x00000000  # PUBLIC


class Encryption(IntEnum):
    NONE = 0x00000000  # PUBLIC
    DES_CBC = 0x00001212  # PUBLIC


class Mac(IntEnum):
    NONE = 0x00000000  # PUBLIC
    MD5 = 0x00001441  # PUBLIC
    DES_MAC = 0x00004001  # PUBLIC


MAC_SIZE = {Mac.NONE: 0, Mac.MD5: 16, Mac.DES_MAC: 8}  # PUBLIC (MD5 128-bit, DES-MAC 64-bit)

# --- CHOICE: key-derivation labels -----------------------------------------------------------
# A derived key is parity(E_KE(RS ^ RC ^ R ^ LABEL)): one ECB block under an encryption key, which
# a card (INTERNAL AUTHENTICATE) and a token (CKM_DES_ECB_ENCRYPT_DATA) compute alike. R is zero for
# connection keys and the sender's random number for unique session keys. The labels separate
# direction (client->server, server->client) and use (data cipher, DES-MAC key, handshake MAC).
LABEL_ENC_C2S = b"ISCLec2s"
LABEL_ENC_S2C = b"ISCLes2c"
LABEL_MAC_C2S = b"ISCLmc2s"
LABEL_MAC_S2C = b"ISCLms2c"
LABEL_FINISHED = b"ISCLfini"

# --- PUBLIC: the header ----------------------------------------------------------------------

_HEADER = struct.Struct(">8I")


@dataclass(frozen=True, slots=True)
class Header:
    """The 32-byte header; Indicator and TimeStamp are unused (zero), ErrNo carries a NAK's code."""

    message_id: int
    data_length: int
    option: int = ACK
    err_no: int = 0

    def encode(self) -> bytes:
        return _HEADER.pack(0, self.message_id, self.data_length, self.option, 0, self.err_no, 0, 0)

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> Header:
        if len(raw) != HEADER_SIZE:
            raise RemoteProtocolError(
                ErrorCode.BAD_LENGTH, f"a message header is {HEADER_SIZE} bytes, not {len(raw)}"
            )
        _ind, mid, length, option, _ts, err_no, _p1, _p2 = _HEADER.unpack(raw)
        return cls(mid, length, option, err_no)


def frame(message_id: MessageId, payload: bytes = b"", *, option: int = ACK, err_no: int = 0) -> bytes:
    """One ISCL message: header then payload."""
    return Header(message_id, len(payload), option, err_no).encode() + payload


# --- CHOICE: payload layouts ------------------------------------------------------------------


class _Fixed:
    """A payload of fixed layout: its fields in declaration order, packed by ``_fmt``."""

    __slots__ = ()
    _fmt: ClassVar[struct.Struct]
    _what: ClassVar[str]

    def encode(self) -> bytes:
        return self._fmt.pack(*(getattr(self, f.name) for f in fields(self)))  # type: ignore[arg-type]

    @classmethod
    def decode(cls, p: bytes) -> Self:
        return cls(*_unpack(cls._fmt, p, cls._what))


@dataclass(frozen=True, slots=True)
class LineConnectionRq(_Fixed):
    """Server -> client: its maximum block length and its version."""

    max_block: int
    version: bytes = VERSION
    _fmt: ClassVar[struct.Struct] = struct.Struct(">I16s")
    _what: ClassVar[str] = "line connection check request"


@dataclass(frozen=True, slots=True)
class LineConnectionRp(_Fixed):
    """Client -> server: status and the agreed block length min(client, server)."""

    status: int
    block_length: int
    _fmt: ClassVar[struct.Struct] = struct.Struct(">II")
    _what: ClassVar[str] = "line connection check response"


@dataclass(frozen=True, slots=True)
class MutualAuthRq:
    """Client -> server: method, key-pair id, and the client's authentication data."""

    method: int
    key_id: int
    auth_data: bytes
    _fmt = struct.Struct(">III")

    def encode(self) -> bytes:
        return self._fmt.pack(self.method, self.key_id, len(self.auth_data)) + self.auth_data

    @classmethod
    def decode(cls, p: bytes) -> MutualAuthRq:
        method, key_id, n = _unpack(cls._fmt, p[: cls._fmt.size], "mutual authentication request")
        return cls(method, key_id, _tail(p, cls._fmt.size, n, "authentication data"))


@dataclass(frozen=True, slots=True)
class MutualAuthRp:
    """Server -> client: status and the server's authentication data."""

    status: int
    auth_data: bytes
    _fmt = struct.Struct(">II")

    def encode(self) -> bytes:
        return self._fmt.pack(self.status, len(self.auth_data)) + self.auth_data

    @classmethod
    def decode(cls, p: bytes) -> MutualAuthRp:
        status, n = _unpack(cls._fmt, p[: cls._fmt.size], "mutual authentication response")
        return cls(status, _tail(p, cls._fmt.size, n, "authentication data"))


@dataclass(frozen=True, slots=True)
class Pass1(_Fixed):
    """Server -> client: the server's challenge RS (GET CHALLENGE)."""

    status: int
    challenge: bytes
    result: int = 0
    _fmt: ClassVar[struct.Struct] = struct.Struct(">I8sI")
    _what: ClassVar[str] = "authentication pass 1"


@dataclass(frozen=True, slots=True)
class Pass2(_Fixed):
    """Client -> server: E_K(RS) and the client's challenge RC."""

    status: int
    response: bytes
    challenge: bytes
    option: int = 0
    _fmt: ClassVar[struct.Struct] = struct.Struct(">I8s8sI")
    _what: ClassVar[str] = "authentication pass 2"


@dataclass(frozen=True, slots=True)
class Pass3(_Fixed):
    """Server -> client: E_K(RC) and (CHOICE) the server's handshake MAC."""

    status: int
    response: bytes
    option: int
    finished: bytes
    _fmt: ClassVar[struct.Struct] = struct.Struct(">I8sI8s")
    _what: ClassVar[str] = "authentication pass 3"


@dataclass(frozen=True, slots=True)
class Completion(_Fixed):
    """Client -> server: the result and (CHOICE) the client's handshake MAC."""

    result: int
    finished: bytes
    _fmt: ClassVar[struct.Struct] = struct.Struct(">I8s")
    _what: ClassVar[str] = "authentication completion"


@dataclass(frozen=True, slots=True)
class TransmissionRq(_Fixed):
    """Sender -> receiver: how the next message is protected, and its length."""

    encryption: int
    key_id: int
    mac: int
    length: int
    _fmt: ClassVar[struct.Struct] = struct.Struct(">IIII")
    _what: ClassVar[str] = "message transmission request"


@dataclass(frozen=True, slots=True)
class TransmissionRp(_Fixed):
    """Receiver -> sender: the result code (0 on ACK) and the longest message it accepts."""

    result: int
    max_length: int
    _fmt: ClassVar[struct.Struct] = struct.Struct(">II")
    _what: ClassVar[str] = "message transmission response"


@dataclass(frozen=True, slots=True)
class RandomNumberRq(_Fixed):
    """Sender -> receiver: the random number R for this message's session keys."""

    random: bytes
    result: int = 0
    _fmt: ClassVar[struct.Struct] = struct.Struct(">8sI")
    _what: ClassVar[str] = "session-key random number request"


STATUS = struct.Struct(">I")
"""CHOICE: RNDNO_FOR_SESSION_KEY_RP and LINE_DISCONNECTION_RP carry one status word."""


def encode_status(status: int) -> bytes:
    return STATUS.pack(status)


def decode_status(p: bytes, what: str) -> int:
    (status,) = _unpack(STATUS, p, what)
    return int(status)


def _unpack(fmt: struct.Struct, p: bytes, what: str) -> tuple:  # type: ignore[type-arg]
    if len(p) != fmt.size:
        raise RemoteProtocolError(
            ErrorCode.BAD_LENGTH,
            f"the peer sent a {what} of {len(p)} bytes; {fmt.size} were expected",
        )
    return fmt.unpack(p)


def _tail(p: bytes, offset: int, n: int, what: str) -> bytes:
    if len(p) != offset + n:
        raise RemoteProtocolError(
            ErrorCode.BAD_LENGTH, f"the peer's {what} length field ({n}) does not match the message"
        )
    return bytes(p[offset:])
