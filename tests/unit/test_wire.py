"""The wire format: constants from the public record, and encode/decode of every message."""

from __future__ import annotations

import struct

import pytest

from iscl_hsm import wire
from iscl_hsm.errors import ErrorCode, RemoteProtocolError
from iscl_hsm.wire import AuthMethod, Encryption, Mac, MessageId

# --- constants from the public record ---------------------------------------------------------


def test_message_ids_are_the_public_values() -> None:
    assert {m.name: m.value for m in MessageId} == {
        "LINE_CONNECTION_CHECK_RQ": 0x00110001,
        "LINE_CONNECTION_CHECK_RP": 0x00110003,
        "MUTUAL_AUTH_RQ": 0x00120001,
        "MUTUAL_AUTH_RP": 0x00120003,
        "MUTUAL_AUTH_PASS1_NOTIF": 0x00130002,
        "MUTUAL_AUTH_PASS2_NOTIF": 0x00140002,
        "MUTUAL_AUTH_PASS3_NOTIF": 0x00150002,
        "MUTUAL_AUTH_COMPLETION_NOTIF": 0x00160002,
        "MESSAGE_TRANSMISSION_RQ": 0x00200001,
        "MESSAGE_TRANSMISSION_RP": 0x00200003,
        "MESSAGE_TRANSMISSION_NOTIF": 0x00200002,
        "RNDNO_FOR_SESSION_KEY_RQ": 0x00210001,
        "RNDNO_FOR_SESSION_KEY_RP": 0x00210003,
        "MAC_TRANSMISSION_NOTIF": 0x00230002,
        "THROUGH_MODE_TRANSMISSION_NOTIF": 0x00260002,
        "LINE_DISCONNECTION_RQ": 0x00FF0001,
        "LINE_DISCONNECTION_RP": 0x00FF0003,
    }


def test_algorithm_codes_are_the_public_values() -> None:
    assert AuthMethod.THREE_PASS_FOUR_WAY == 0x00000000
    assert {e.name: e.value for e in Encryption} == {"NONE": 0x00000000, "DES_CBC": 0x00001212}
    assert {m.name: m.value for m in Mac} == {"NONE": 0x00000000, "MD5": 0x00001441, "DES_MAC": 0x00004001}
    assert wire.MAC_SIZE == {Mac.NONE: 0, Mac.MD5: 16, Mac.DES_MAC: 8}


def test_sizes_and_options_are_the_public_values() -> None:
    assert wire.VERSION == b"MEDIS-ISCL V1.00"
    assert len(wire.VERSION) == 16
    assert wire.HEADER_SIZE == 32
    assert wire.MAX_BLOCK == 8160
    assert wire.MAX_BLOCK + wire.HEADER_SIZE == 8192
    assert wire.DEFAULT_MAX_MESSAGE == 1024 * 1024
    assert wire.MAX_AUTH_DATA == 128
    assert wire.CHALLENGE_SIZE == 8
    assert (wire.ACK, wire.NAK) == (0x00000000, 0xFFFFFFFF)
    assert wire.SESSION_KEYS == 0x10
    assert wire.DEFAULT_PORT == 2761


def test_error_codes_are_the_sdk_numbers() -> None:
    assert [c.value for c in ErrorCode if c.value < 120] == list(range(100, 116))
    assert ErrorCode.PEER_REFUSED_CLOSE == 115
    assert ErrorCode.TRANSMISSION_MISMATCH == 109
    assert ErrorCode.PEER_LENGTH_TOO_SMALL == 110
    assert ErrorCode.LOCAL_LENGTH_TOO_SMALL == 111


def test_derivation_labels_are_distinct_single_blocks() -> None:
    labels = [wire.LABEL_ENC_C2S, wire.LABEL_ENC_S2C, wire.LABEL_MAC_C2S, wire.LABEL_MAC_S2C, wire.LABEL_FINISHED]
    assert all(len(label) == 8 for label in labels)
    assert len(set(labels)) == len(labels)


# --- the header ---------------------------------------------------------------------------------


def test_header_layout_is_eight_big_endian_words() -> None:
    h = wire.Header(MessageId.MESSAGE_TRANSMISSION_RP, 0x01020304, wire.NAK, 110)
    raw = h.encode()
    assert len(raw) == 32
    assert struct.unpack(">8I", raw) == (0, 0x00200003, 0x01020304, 0xFFFFFFFF, 0, 110, 0, 0)
    assert raw[8:12] == b"\x01\x02\x03\x04"  # DataLength at offset 8, network byte order
    assert wire.Header.decode(raw) == h


def test_header_decode_ignores_unused_fields() -> None:
    raw = struct.pack(">8I", 7, 0x00110001, 20, 0, 99, 3, 5, 6)
    assert wire.Header.decode(raw) == wire.Header(0x00110001, 20, 0, 3)
    assert wire.Header.decode(memoryview(raw)) == wire.Header(0x00110001, 20, 0, 3)


@pytest.mark.parametrize("n", [0, 31, 33])
def test_header_decode_of_wrong_length_is_bad_length(n: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        wire.Header.decode(bytes(n))
    assert info.value.code is ErrorCode.BAD_LENGTH


def test_frame_is_header_then_payload() -> None:
    raw = wire.frame(MessageId.LINE_DISCONNECTION_RP, b"\x00\x00\x00\x73", option=wire.NAK, err_no=115)
    assert wire.Header.decode(raw[:32]) == wire.Header(MessageId.LINE_DISCONNECTION_RP, 4, wire.NAK, 115)
    assert raw[32:] == b"\x00\x00\x00\x73"
    assert wire.frame(MessageId.LINE_DISCONNECTION_RQ) == wire.Header(MessageId.LINE_DISCONNECTION_RQ, 0).encode()


# --- payloads -----------------------------------------------------------------------------------

SAMPLES = [
    wire.LineConnectionRq(8160),
    wire.LineConnectionRq(8, b"MEDIS-ISCL V9.99"),
    wire.LineConnectionRp(0, 4096),
    wire.LineConnectionRp(ErrorCode.BAD_VERSION, 0),
    wire.Pass1(0, b"\x01" * 8),
    wire.Pass1(0, bytes(range(8)), 7),
    wire.Pass2(0, b"\xaa" * 8, b"\x55" * 8),
    wire.Pass2(ErrorCode.REMOTE_KEY_HOLDER, bytes(8), bytes(8), 1),
    wire.TransmissionRq(Encryption.DES_CBC, wire.SESSION_KEYS, Mac.MD5, 0xFFFFFFFF),
    wire.TransmissionRq(Encryption.NONE, 1, Mac.NONE, 0),
    wire.TransmissionRp(0, 1 << 20),
    wire.TransmissionRp(ErrorCode.PEER_LENGTH_TOO_SMALL, 100),
    wire.RandomNumberRq(b"\xfe" * 8),
    wire.RandomNumberRq(b"\x01" * 8, 5),
]
"""Payloads laid out the same in both profiles."""

PROFILE_SAMPLES = [
    (wire.HARDENED_LAYOUT, wire.MutualAuthRq(AuthMethod.THREE_PASS_FOUR_WAY, 3, b"x")),
    (wire.HARDENED_LAYOUT, wire.MutualAuthRq(AuthMethod.THREE_PASS_FOUR_WAY, 8, bytes(range(128)))),
    (wire.HARDENED_LAYOUT, wire.MutualAuthRp(0, b"server auth data")),
    (wire.HARDENED_LAYOUT, wire.MutualAuthRp(ErrorCode.BAD_OPTION, b"")),
    (wire.HARDENED_LAYOUT, wire.Pass3(0, b"\x12" * 8, 0, b"\x34" * 8)),
    (wire.HARDENED_LAYOUT, wire.Completion(0, b"\x9a" * 8)),
    (wire.V100_LAYOUT, wire.MutualAuthRq(AuthMethod.THREE_PASS_FOUR_WAY, 3)),
    (wire.V100_LAYOUT, wire.MutualAuthRq(AuthMethod.THREE_PASS_FOUR_WAY, 8, bytes(range(128)))),
    (wire.V100_LAYOUT, wire.MutualAuthRp(0)),
    (wire.V100_LAYOUT, wire.MutualAuthRp(0, b"server auth data")),
    (wire.V100_LAYOUT, wire.Pass3(0, b"\x12" * 8, 0)),
    (wire.V100_LAYOUT, wire.Completion(0)),
]
"""Payloads whose layout is the profile's (wire.Layout)."""


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_payload_round_trip(msg: object) -> None:
    raw = msg.encode()  # type: ignore[attr-defined]
    assert type(msg).decode(raw) == msg  # type: ignore[attr-defined]


def _encode(layout: wire.Layout, msg: object) -> bytes:
    if isinstance(msg, wire.MutualAuthRq | wire.MutualAuthRp):
        return msg.encode(layout)
    return msg.encode()  # type: ignore[attr-defined, no-any-return]


@pytest.mark.parametrize(("layout", "msg"), PROFILE_SAMPLES, ids=lambda x: getattr(x, "name", type(x).__name__))
def test_profile_payload_round_trip(layout: wire.Layout, msg: object) -> None:
    assert type(msg).decode(_encode(layout, msg), layout) == msg  # type: ignore[attr-defined]


def test_every_payload_class_is_covered() -> None:
    classes = {
        wire.LineConnectionRq, wire.LineConnectionRp, wire.MutualAuthRq, wire.MutualAuthRp, wire.Pass1,
        wire.Pass2, wire.Pass3, wire.Completion, wire.TransmissionRq, wire.TransmissionRp, wire.RandomNumberRq,
    }
    assert {type(m) for m in SAMPLES} | {type(m) for _, m in PROFILE_SAMPLES} == classes


def test_v100_payloads_are_the_sdk_builders_fields_alone() -> None:
    """MUTUAL_AUTH_RQ (method, key-pair id), RP (status), PASS3 (status, response, option), COMPLETION (result)."""
    layout = wire.V100_LAYOUT
    assert wire.MutualAuthRq(0, 2).encode(layout) == struct.pack(">2I", 0, 2)
    assert wire.MutualAuthRp(5).encode(layout) == struct.pack(">I", 5)
    assert wire.Pass3(0, b"R" * 8).encode() == struct.pack(">I", 0) + b"R" * 8 + bytes(4)
    assert wire.Completion(7).encode() == struct.pack(">I", 7)
    # Authentication data, when there is some, follows the builder's fields, counted.
    assert wire.MutualAuthRq(0, 2, b"ab").encode(layout) == struct.pack(">3I", 0, 2, 2) + b"ab"


@pytest.mark.parametrize("layout", [wire.V100_LAYOUT, wire.HARDENED_LAYOUT], ids=lambda x: x.name)
def test_handshake_mac_fields_are_the_profiles(layout: wire.Layout) -> None:
    size = 16 + layout.finished_size
    with pytest.raises(RemoteProtocolError) as info:
        wire.Pass3.decode(bytes(size + 8 if layout.finished_size == 0 else 16), layout)
    assert info.value.code is ErrorCode.BAD_LENGTH
    assert wire.Pass3.decode(bytes(size), layout).finished == bytes(layout.finished_size)
    assert wire.Completion.decode(bytes(4 + layout.finished_size), layout).finished == bytes(layout.finished_size)


def test_payload_layouts_are_big_endian_words() -> None:
    assert wire.LineConnectionRq(8160).encode() == b"\x00\x00\x1f\xe0" + b"MEDIS-ISCL V1.00"
    assert wire.TransmissionRq(0x1212, 0x10, 0x4001, 5).encode() == struct.pack(">4I", 0x1212, 0x10, 0x4001, 5)
    assert wire.MutualAuthRq(0, 2, b"ab").encode(wire.HARDENED_LAYOUT) == struct.pack(">3I", 0, 2, 2) + b"ab"
    assert wire.MutualAuthRp(0, b"abc").encode(wire.HARDENED_LAYOUT) == struct.pack(">2I", 0, 3) + b"abc"
    assert wire.Pass2(0, b"R" * 8, b"C" * 8).encode() == struct.pack(">I", 0) + b"R" * 8 + b"C" * 8 + bytes(4)


@pytest.mark.parametrize("status", [0, 1, 115, 0xFFFFFFFF])
def test_status_round_trip(status: int) -> None:
    raw = wire.encode_status(status)
    assert len(raw) == 4
    assert wire.decode_status(raw, "status") == status


FIXED = [
    wire.LineConnectionRq, wire.LineConnectionRp, wire.Pass1, wire.Pass2, wire.TransmissionRq, wire.TransmissionRp,
    wire.RandomNumberRq,
]


@pytest.mark.parametrize("cls", FIXED, ids=lambda c: c.__name__)
@pytest.mark.parametrize("delta", [-1, 1, "empty"])
def test_fixed_payload_of_wrong_length_is_bad_length(cls: type, delta: int | str) -> None:
    size = cls._fmt.size  # type: ignore[attr-defined]
    n = 0 if delta == "empty" else size + int(delta)
    with pytest.raises(RemoteProtocolError) as info:
        cls.decode(bytes(n))  # type: ignore[attr-defined]
    assert info.value.code is ErrorCode.BAD_LENGTH


@pytest.mark.parametrize("n", [0, 3, 5])
def test_status_of_wrong_length_is_bad_length(n: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        wire.decode_status(bytes(n), "line disconnection response")
    assert info.value.code is ErrorCode.BAD_LENGTH


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        struct.pack(">II", 0, 1),  # shorter than the fixed part
        struct.pack(">III", 0, 1, 5) + b"abcd",  # length field says 5, 4 follow
        struct.pack(">III", 0, 1, 3) + b"abcd",  # length field says 3, 4 follow
        struct.pack(">III", 0, 1, 0xFFFFFFFF) + b"abcd",
    ],
)
def test_auth_rq_of_wrong_length_is_bad_length(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        wire.MutualAuthRq.decode(raw, wire.HARDENED_LAYOUT)
    assert info.value.code is ErrorCode.BAD_LENGTH


@pytest.mark.parametrize(
    "raw",
    [b"", struct.pack(">I", 0), struct.pack(">II", 0, 2) + b"a", struct.pack(">II", 0, 0) + b"a"],
)
def test_auth_rp_of_wrong_length_is_bad_length(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        wire.MutualAuthRp.decode(raw, wire.HARDENED_LAYOUT)
    assert info.value.code is ErrorCode.BAD_LENGTH


@pytest.mark.parametrize(
    "raw",
    [b"", struct.pack(">I", 0), struct.pack(">III", 0, 1, 5) + b"abcd", struct.pack(">II", 0, 1) + b"ab"],
)
def test_v100_auth_rq_is_the_builder_fields_or_those_and_counted_data(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        wire.MutualAuthRq.decode(raw, wire.V100_LAYOUT)
    assert info.value.code is ErrorCode.BAD_LENGTH


def test_padding_carries_its_own_length() -> None:
    """RFC 1423 / PKCS#5: always 1..8 bytes, each holding the count; checked exactly."""
    assert [wire.pad_pkcs5(n) for n in (0, 1, 7, 8, 13)] == [bytes([8]) * 8, bytes([7]) * 7, b"\x01", bytes([8]) * 8, bytes([3]) * 3]
    assert all(wire.is_pkcs5_padding(wire.pad_pkcs5(n)) for n in range(20))
    for bad in (b"", b"\x00", b"\x02", b"\x02\x01", bytes([9]) * 9, b"\x03\x03\x02"):
        assert not wire.is_pkcs5_padding(bad)
