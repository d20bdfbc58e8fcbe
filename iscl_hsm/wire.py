"""Every byte decision of ISCL V1.00, in one place.

What comes from the public record (message ids, option values, algorithm codes, sizes, the 32-byte
header of eight 32-bit fields, the version string) is marked PUBLIC below; what the record leaves open
(byte order, payload layouts, labels) is marked CHOICE and explained in docs/protocol.md.

CHOICE: every integer is an unsigned 32-bit big-endian number (network byte order, as DICOM's own
PDUs), and every payload is a fixed sequence of such integers and fixed-length byte strings, with at
most one variable-length byte string at the end, preceded by its length.

Two wire profiles share these layouts (docs/protocol.md, "Profiles"): V1.00, the SDK builders' fields
and nothing else, and hardened, which adds handshake MACs and always counts the authentication data.
:class:`Layout` holds the few payload decisions that differ, one instance per profile.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from enum import Enum, IntEnum
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
CONTROL_LIMIT = 16 + 3 * 4 + MAX_AUTH_DATA
"""CHOICE: no handshake or control payload is longer than this; larger lengths are refused unread."""
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


class Md5Order(Enum):
    """PUBLIC (PS3.15 B.2): the two ways of making an MD5 MAC; a receiver must check either.

    CHOICE: "encrypt the random number before applying MD5" is MD5(message || E_K(R)), the random
    number R encrypted (one DES block, ECB) under the message's key and put after the message, so that
    a receiver checks both orders with one MD5 pass. R is the message's session-key random number, or
    with key ids 1..8 the link's server challenge.
    """

    ENCRYPT_OUTPUT = "encrypt-output"  # E(MD5(message)): what the LEADTOOLS SDK sends
    ENCRYPT_RANDOM = "encrypt-random"  # MD5(message || E_K(R))


# --- CHOICE: V1.00 padding -------------------------------------------------------------------
# PUBLIC (LT headers): encryption always adds padding that decryption removes and checks.
# CHOICE: the padding of RFC 1423 / PKCS#5: n bytes of value n, n = 1..8, so an aligned message gets
# a whole block of padding. Used on the data and on the MAC block of the V1.00 profile.


def pad_pkcs5(length: int) -> bytes:
    """The padding that follows ``length`` bytes of plaintext: 1..8 bytes, each holding the count."""
    n = 8 - length % 8
    return bytes([n]) * n


def is_pkcs5_padding(padding: bytes | memoryview) -> bool:
    """True when ``padding`` is exactly what :func:`pad_pkcs5` adds (checked after the MAC)."""
    n = len(padding)
    return 1 <= n <= 8 and bytes(padding) == bytes([n]) * n

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

# --- CHOICE: what the hardened profile's MACs name -------------------------------------------
# The handshake MACs (PASS3, COMPLETION) and the disconnection MACs name the end that made them, so
# that no MAC of one end is accepted as the other's (reflection).
SERVER_LABEL = b"server\0\0"
CLIENT_LABEL = b"client\0\0"

# LINE_DISCONNECTION_RQ carries DES-MAC(LABEL_CLOSE_RQ || sender || counts) and LINE_DISCONNECTION_RP
# its status, then DES-MAC(LABEL_CLOSE_RP || sender || counts), under the handshake-MAC key, where
# counts are the secured messages the link carried client -> server and server -> client (u64 each,
# big-endian). A disconnection that is forged, or that follows a lost message, then fails to verify.
LABEL_CLOSE_RQ = b"ISCLclrq"
LABEL_CLOSE_RP = b"ISCLclrp"
_COUNTS = struct.Struct(">QQ")


def message_counts(sender_is_client: bool, client_to_server: int, server_to_client: int) -> bytes:
    """What a disconnection MAC covers after its label: who sent it, and both directions' counts."""
    sender = CLIENT_LABEL if sender_is_client else SERVER_LABEL
    return sender + _COUNTS.pack(client_to_server, server_to_client)

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
class Layout:
    """The payload decisions that differ between the two profiles (all CHOICE, docs/protocol.md §3).

    V1.00 sends the SDK builders' fields and nothing else: authentication data only when there is
    some (as a counted tail after the builder's fields), no handshake MACs, ErrNo always zero, and
    MESSAGE_TRANSMISSION_RP's first field the ACK/NAK value itself. Hardened is the wire of the
    releases before the profiles existed, unchanged.
    """

    name: str
    finished_size: int
    """Bytes of handshake MAC after the builder's fields of PASS3 and COMPLETION."""
    auth_data_always_counted: bool
    """MUTUAL_AUTH_RQ/RP carry (u32 length, data) even when there is no data."""
    err_no_carries_code: bool
    """A NAK's ErrNo holds the error code (else ErrNo is zero, and ignored on receipt)."""
    rp_result_is_code: bool
    """MESSAGE_TRANSMISSION_RP's first field holds the error code (else ACK or NAK)."""
    disconnection_mac_size: int
    """Bytes of MAC in LINE_DISCONNECTION_RQ, and after the status of LINE_DISCONNECTION_RP."""

    def err_no(self, code: int) -> int:
        """The ErrNo of a NAK refusing with ``code``."""
        return code if self.err_no_carries_code else 0

    def nak_code(self, header: Header, status: int) -> int:
        """The error code a NAK (or a non-zero status) carries."""
        return (header.err_no or status) if self.err_no_carries_code else status

    def rp_result(self, code: int) -> int:
        """MESSAGE_TRANSMISSION_RP's first field when refusing with ``code`` (0 accepts)."""
        if code == 0 or self.rp_result_is_code:
            return code
        return NAK

    def refusal_code(self, header: Header, rp: TransmissionRp, length: int) -> int:
        """Why the peer refused our message of ``length`` bytes.

        V1.00 says only NAK and the peer's largest message: a smaller largest message means 110
        (the peer's length is too small), anything else 109 (encryption, key id or MAC differ).
        """
        if self.rp_result_is_code:
            return header.err_no or rp.result
        if rp.max_length < length:
            return ErrorCode.PEER_LENGTH_TOO_SMALL
        return ErrorCode.TRANSMISSION_MISMATCH


V100_LAYOUT = Layout("v1.00", finished_size=0, auth_data_always_counted=False, err_no_carries_code=False,
                     rp_result_is_code=False, disconnection_mac_size=0)
HARDENED_LAYOUT = Layout("hardened", finished_size=8, auth_data_always_counted=True, err_no_carries_code=True,
                         rp_result_is_code=True, disconnection_mac_size=8)


@dataclass(frozen=True, slots=True)
class MutualAuthRq:
    """Client -> server: method, key-pair id (PUBLIC fields); then (CHOICE) the client's authentication data."""

    method: int
    key_id: int
    auth_data: bytes = b""
    _fmt = struct.Struct(">II")

    def encode(self, layout: Layout) -> bytes:
        return self._fmt.pack(self.method, self.key_id) + _counted(self.auth_data, layout)

    @classmethod
    def decode(cls, p: bytes, layout: Layout) -> MutualAuthRq:
        what = "mutual authentication request"
        method, key_id = _unpack(cls._fmt, p[: cls._fmt.size], what)
        return cls(method, key_id, _counted_tail(p, cls._fmt.size, layout, what))


@dataclass(frozen=True, slots=True)
class MutualAuthRp:
    """Server -> client: status (PUBLIC field); then (CHOICE) the server's authentication data."""

    status: int
    auth_data: bytes = b""
    _fmt = struct.Struct(">I")

    def encode(self, layout: Layout) -> bytes:
        return self._fmt.pack(self.status) + _counted(self.auth_data, layout)

    @classmethod
    def decode(cls, p: bytes, layout: Layout) -> MutualAuthRp:
        what = "mutual authentication response"
        (status,) = _unpack(cls._fmt, p[: cls._fmt.size], what)
        return cls(status, _counted_tail(p, cls._fmt.size, layout, what))


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
class Pass3:
    """Server -> client: status, E_K(RC), option (PUBLIC fields); hardened adds the server's handshake MAC."""

    status: int
    response: bytes
    option: int = 0
    finished: bytes = b""
    _fmt = struct.Struct(">I8sI")

    def encode(self) -> bytes:
        return self._fmt.pack(self.status, self.response, self.option) + self.finished

    @classmethod
    def decode(cls, p: bytes, layout: Layout) -> Pass3:
        fixed = _sized(p, cls._fmt.size + layout.finished_size, "authentication pass 3")
        status, response, option = cls._fmt.unpack_from(fixed)
        return cls(status, response, option, bytes(fixed[cls._fmt.size :]))


@dataclass(frozen=True, slots=True)
class Completion:
    """Client -> server: the authentication result (PUBLIC field); hardened adds the client's handshake MAC."""

    result: int
    finished: bytes = b""
    _fmt = struct.Struct(">I")

    def encode(self) -> bytes:
        return self._fmt.pack(self.result) + self.finished

    @classmethod
    def decode(cls, p: bytes, layout: Layout) -> Completion:
        fixed = _sized(p, cls._fmt.size + layout.finished_size, "authentication completion")
        (result,) = cls._fmt.unpack_from(fixed)
        return cls(result, bytes(fixed[cls._fmt.size :]))


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


@dataclass(frozen=True, slots=True)
class DisconnectionRq:
    """Either end -> the other: no payload in V1.00; hardened: the disconnection MAC."""

    mac: bytes = b""

    def encode(self) -> bytes:
        return self.mac

    @classmethod
    def decode(cls, p: bytes, layout: Layout) -> DisconnectionRq:
        return cls(_sized(p, layout.disconnection_mac_size, "line disconnection request"))


@dataclass(frozen=True, slots=True)
class DisconnectionRp:
    """The answer: status (0, or 115 refusing); hardened adds the answering end's disconnection MAC."""

    status: int
    mac: bytes = b""

    def encode(self) -> bytes:
        return STATUS.pack(self.status) + self.mac

    @classmethod
    def decode(cls, p: bytes, layout: Layout) -> DisconnectionRp:
        fixed = _sized(p, STATUS.size + layout.disconnection_mac_size, "line disconnection response")
        (status,) = STATUS.unpack_from(fixed)
        return cls(status, bytes(fixed[STATUS.size :]))


STATUS = struct.Struct(">I")
"""CHOICE: RNDNO_FOR_SESSION_KEY_RP (and LINE_DISCONNECTION_RP, before its MAC) carry one status word."""


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


def _sized(p: bytes, size: int, what: str) -> bytes:
    """``p`` itself, if it is ``size`` bytes long."""
    if len(p) != size:
        raise RemoteProtocolError(
            ErrorCode.BAD_LENGTH, f"the peer sent a {what} of {len(p)} bytes; {size} were expected"
        )
    return p


_COUNT = struct.Struct(">I")


def _counted(data: bytes, layout: Layout) -> bytes:
    """Authentication data as (u32 length, bytes); nothing at all for none under V1.00."""
    if not data and not layout.auth_data_always_counted:
        return b""
    return _COUNT.pack(len(data)) + data


def _counted_tail(p: bytes, offset: int, layout: Layout, what: str) -> bytes:
    """The counted authentication data after the builder's fields (V1.00: may be absent)."""
    if len(p) == offset and not layout.auth_data_always_counted:
        return b""
    (n,) = _unpack(_COUNT, p[offset : offset + _COUNT.size], f"{what}'s authentication data length")
    if len(p) != offset + _COUNT.size + n:
        raise RemoteProtocolError(
            ErrorCode.BAD_LENGTH, f"the peer's {what} authentication data length field ({n}) does not match the message"
        )
    return bytes(p[offset + _COUNT.size :])
