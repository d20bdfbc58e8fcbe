"""Key components and check values (iscl_hsm.keys.components); the token-side checks are in test_keys_cli."""

from __future__ import annotations

import pytest

from iscl_hsm.crypto.des import has_odd_parity, is_weak
from iscl_hsm.keys.components import (
    ALGORITHMS,
    ComponentError,
    algorithm_for,
    combine,
    format_hex,
    kcv_of,
    parse_component,
    parse_kcv,
    split,
)

DES, DES3, AES128, AES256 = (ALGORITHMS[n] for n in ("des", "des3", "aes128", "aes256"))


def test_known_check_values() -> None:
    assert kcv_of(DES, bytes.fromhex("0123456789ABCDEF")).hex().upper() == "D5D44F"  # FIPS 81 key
    # AES: first 3 bytes of AES-ECB(key, 16 zero bytes) (FIPS 197 C.1 key, zero block by hand below).
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = bytes(range(16))
    block = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(bytes(16))
    assert kcv_of(AES128, key) == block[:3]
    with pytest.raises(ComponentError, match="16 bytes long, not 8"):
        kcv_of(AES128, bytes(8))


def test_xor_of_components_is_the_key_parity_adjusted() -> None:
    c1, c2 = bytes.fromhex("0123456789ABCDEF"), bytes.fromhex("9D0BBF51C7E6645D")
    key = combine(DES, [c1, c2])
    assert key == bytes.fromhex("9D29FB374F4CA8B3")
    assert has_odd_parity(key) and key != bytes(a ^ b for a, b in zip(c1, c2))  # even parity was fixed
    three = combine(DES, [c1, c2, bytes.fromhex("133457799BBCDFF1")])
    assert three == bytes(
        a ^ b ^ c for a, b, c in zip(c1, c2, bytes.fromhex("133457799BBCDFF1"))
    )  # odd already


def test_parse_component_accepts_spaces_and_lower_case() -> None:
    assert parse_component("0123 4567 89ab cdef", DES, 1) == (bytes.fromhex("0123456789ABCDEF"), "")
    assert parse_kcv(" d5d4 4f ") == bytes.fromhex("D5D44F")
    assert format_hex(bytes.fromhex("0123456789ABCDEF")) == "0123 4567 89AB CDEF"


@pytest.mark.parametrize(
    ("text", "algorithm", "match"),
    [
        ("", DES, "component 2 is empty"),
        ("0123456789ABCDEG", DES, "not hexadecimal"),
        ("0123456789ABCD", DES, "14 hex digits; a des component has 16"),
        ("0123456789ABCDEF", DES3, "16 hex digits; a des3 component has 48"),
        ("0022446688AACCEE", DES, "wrong DES parity in byte 1, 2, 3, 4, 5, 6, 7, 8"),
        ("0101010101010101", DES, "weak or semi-weak"),
        ("E001E001F101F101", DES, "weak or semi-weak"),
        ("00" * 16, AES128, "all zeros"),
    ],
)
def test_bad_components(text: str, algorithm: object, match: str) -> None:
    with pytest.raises(ComponentError, match=match) as caught:
        parse_component(text, algorithm, 2)  # type: ignore[arg-type]
    assert text not in str(caught.value) or not text


def test_parity_is_fixed_only_when_asked() -> None:
    value, note = parse_component("0022446688AACCEE", DES, 1, fix=True)
    assert has_odd_parity(value) and note == "component 1: DES parity fixed in byte 1, 2, 3, 4, 5, 6, 7, 8"


def test_degenerate_keys_are_refused() -> None:
    c = bytes.fromhex("0123456789ABCDEF")
    with pytest.raises(ComponentError, match="weak"):
        combine(DES, [c, c])
    with pytest.raises(ComponentError, match="equal adjacent"):
        combine(DES3, [c * 3, bytes.fromhex("9D0BBF51C7E6645D") * 3])
    with pytest.raises(ComponentError, match="2 or 3 components"):
        combine(DES, [c])


def test_split_makes_valid_components_of_a_fresh_key() -> None:
    for algorithm in (DES, DES3, AES256):
        for count in (2, 3):
            key, components = split(algorithm, count)
            assert len(components) == count and combine(algorithm, components) == key
            if algorithm.family == "des":
                assert all(has_odd_parity(c) and not is_weak(c) for c in components) and not is_weak(key)
    assert split(DES, 2)[0] != split(DES, 2)[0]


def test_algorithms_suit_purposes() -> None:
    assert algorithm_for("auth", None) is DES and algorithm_for("transport", None) is AES256
    with pytest.raises(ComponentError, match="cannot be aes128"):
        algorithm_for("enc", "aes128")
    with pytest.raises(ComponentError, match="cannot be des"):
        algorithm_for("transport", "des")
    with pytest.raises(ComponentError, match="unknown algorithm"):
        algorithm_for("auth", "idea")
