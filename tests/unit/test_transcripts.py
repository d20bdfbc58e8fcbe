"""Golden transcripts: each end of every recorded link, replayed byte for byte (tests/vectors).

The V1.00 links are also checked against an independent DES (the ``cryptography`` package, not the
engine's OpenSSL binding): the data is DES-CBC under encryption key 1 from a zero IV, one chain runs
on over data and MAC blocks and across both directions, and the MACs cover the message alone.
"""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from iscl_hsm import wire
from iscl_hsm.engine import Profile, Role
from iscl_hsm.wire import MessageId
from tests.helpers import V100_PAYLOAD_SIZES
from tests.vectors import transcripts

LINKS = [(profile, link) for profile in Profile for link in transcripts.load(profile)["links"]]


@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.value)
@pytest.mark.parametrize(("profile", "link"), LINKS, ids=[f"{p.value}:{link['name']}" for p, link in LINKS])
def test_each_end_replays_its_recorded_link_byte_for_byte(profile: Profile, link: dict, role: Role) -> None:
    events = transcripts.replay(profile, link, role)
    expected = transcripts.SERVER_MESSAGE if role is Role.CLIENT else transcripts.CLIENT_MESSAGE
    assert transcripts.received(events) == [expected]


def test_every_suite_is_recorded_in_both_profiles() -> None:
    for profile in Profile:
        names = {link["name"] for link in transcripts.load(profile)["links"]}
        for key in ("key-1", "key-session"):
            for enc in ("none", "des_cbc"):
                for mac in ("none", "md5", "des_mac"):
                    assert f"{enc}/{mac}/{key}" in names, (profile, enc, mac, key)


# --- the V1.00 wire, checked from the outside ---------------------------------------------------------


def _frames(link: dict) -> list[tuple[str, int, bytes]]:
    out = []
    for entry in link["frames"]:
        who, what = entry.split(" ")
        if what in ("send", "close"):
            continue
        raw = bytes.fromhex(what)
        out.append((who, struct.unpack_from(">I", raw, 4)[0], raw[wire.HEADER_SIZE :]))
    return out


def _v100(name: str) -> dict:
    return next(link for link in transcripts.load(Profile.V100)["links"] if link["name"] == name)


def _des(key: bytes, iv: bytes, data: bytes, *, decrypt: bool = True) -> bytes:
    cipher = Cipher(TripleDES(key + key + key), modes.CBC(iv))
    op = cipher.decryptor() if decrypt else cipher.encryptor()
    return op.update(data) + op.finalize()


ENC_KEY_1 = transcripts.KEYS["enc"][1]


def _pkcs5(data: bytes) -> bytes:
    n = 8 - len(data) % 8
    return data + bytes([n]) * n


@pytest.mark.parametrize("mac", ["none", "md5", "des_mac"])
def test_v100_data_is_des_cbc_under_encryption_key_1_from_a_zero_iv_in_one_chain(mac: str) -> None:
    frames = _frames(_v100(f"des_cbc/{mac}/key-1"))
    client_blocks = b"".join(p for who, mid, p in frames if who == "C" and mid == MessageId.MESSAGE_TRANSMISSION_NOTIF)
    (client_mac,) = [p for who, mid, p in frames if who == "C" and mid == MessageId.MAC_TRANSMISSION_NOTIF]
    server_blocks = b"".join(p for who, mid, p in frames if who == "S" and mid == MessageId.MESSAGE_TRANSMISSION_NOTIF)

    # The first secured message: DES-CBC under encryption key 1, IV zero, PKCS#5 padding.
    assert _des(ENC_KEY_1, bytes(8), client_blocks) == _pkcs5(transcripts.CLIENT_MESSAGE)
    # The chain runs on over the MAC block, then over the other direction's message.
    chain = client_blocks[-8:]
    if client_mac:
        mac_plain = _des(ENC_KEY_1, chain, client_mac)
        chain = client_mac[-8:]
        digest = mac_plain[:-8]
        assert mac_plain[-8:] == bytes([8]) * 8  # the MAC block is padded too
        if mac == "md5":
            assert digest == hashlib.md5(transcripts.CLIENT_MESSAGE).digest()  # over the message alone
        else:
            padded = transcripts.CLIENT_MESSAGE + bytes(-len(transcripts.CLIENT_MESSAGE) % 8)
            assert digest == _des(ENC_KEY_1, bytes(8), padded, decrypt=False)[-8:]  # X9.9 under key 1
    else:
        assert mac == "none"
    assert _des(ENC_KEY_1, chain, server_blocks) == _pkcs5(transcripts.SERVER_MESSAGE)


def test_v100_unkeyed_md5_travels_in_the_clear_as_the_sdk_sends_it() -> None:
    frames = _frames(_v100("none/md5/key-1"))
    (client_mac,) = [p for who, mid, p in frames if who == "C" and mid == MessageId.MAC_TRANSMISSION_NOTIF]
    assert client_mac == hashlib.md5(transcripts.CLIENT_MESSAGE).digest()


def test_v100_md5_encrypt_random_order_is_md5_of_message_then_encrypted_challenge() -> None:
    link = _v100("none/md5-encrypt-random/key-1")
    frames = _frames(link)
    (pass1,) = [p for who, mid, p in frames if mid == MessageId.MUTUAL_AUTH_PASS1_NOTIF]
    rs = pass1[4:12]
    (client_mac,) = [p for who, mid, p in frames if who == "C" and mid == MessageId.MAC_TRANSMISSION_NOTIF]
    encrypted_random = _des(ENC_KEY_1, bytes(8), rs, decrypt=False)
    assert client_mac == hashlib.md5(transcripts.CLIENT_MESSAGE + encrypted_random).digest()


def test_v100_payload_sizes_are_the_sdk_builders() -> None:
    sizes = V100_PAYLOAD_SIZES
    seen = set()
    for link in transcripts.load(Profile.V100)["links"]:
        if link["name"].endswith("auth-data"):
            continue
        for _who, mid, payload in _frames(link):
            if mid in sizes:
                assert len(payload) == sizes[mid], (link["name"], MessageId(mid).name, len(payload))
                seen.add(mid)
    assert seen == set(sizes)


def test_v100_header_fields_timestamp_and_errno_are_zero() -> None:
    for link in transcripts.load(Profile.V100)["links"]:
        for entry in link["frames"]:
            raw = entry.split(" ")[1]
            if raw in ("send", "close"):
                continue
            fields = struct.unpack_from(">8I", bytes.fromhex(raw))
            assert (fields[0], fields[4], fields[5], fields[6], fields[7]) == (0, 0, 0, 0, 0)


def _parity(key: bytes) -> bytes:
    return bytes((b & 0xFE) | ((b >> 1).bit_count() + 1) % 2 for b in key)


def test_v100_session_key_is_encryption_key_n_on_the_random_number() -> None:
    """Key id 0x10: each message's key is parity(DES-ECB under encryption key N of R), one block that a
    card's INTERNAL AUTHENTICATE and a token's ECB_ENCRYPT_DATA derivation both compute."""
    frames = _frames(_v100("des_cbc/none/key-session"))
    (rndno,) = [p for who, mid, p in frames if who == "C" and mid == MessageId.RNDNO_FOR_SESSION_KEY_RQ]
    key = _parity(_des(ENC_KEY_1, bytes(8), rndno[:8], decrypt=False))
    blocks = b"".join(p for who, mid, p in frames if who == "C" and mid == MessageId.MESSAGE_TRANSMISSION_NOTIF)
    assert _des(key, bytes(8), blocks) == _pkcs5(transcripts.CLIENT_MESSAGE)
