"""Key components for key ceremonies: parse, check, combine by XOR, and key check values.

A key is entered as 2 or 3 *components* held by different custodians; the key is their XOR, so no
custodian ever sees it whole. Every component and the result are confirmed by a *key check value*
(KCV), 3 bytes that identify a key without revealing it:

* DES, DES2, DES3: the first 3 bytes of the key's encryption of eight zero bytes (as everywhere).
* AES (transport keys): the first 3 bytes of the key's AES-ECB encryption of sixteen zero bytes,
  which is what PKCS#11 v3 tokens (SoftHSM2 among them) put in CKA_CHECK_VALUE. (Payment HSMs per
  ANSI X9.24-1:2017 use a CMAC of zeros instead; the two are not comparable.)

DES conventions: every component must have odd parity (or is parity-adjusted when the officer says
so); the XOR of two odd-parity components has even parity, so the combined key is always
parity-adjusted, at both sites alike. Weak and semi-weak DES keys are refused, as components and as
the combined key, and so is a triple-DES key whose parts are equal (it would be single DES).

Nothing here prints or logs a key or a component; error messages name the component by number.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Final

from iscl_hsm.crypto.des import fix_parity, has_odd_parity, is_weak
from iscl_hsm.crypto.des import kcv as des_kcv
from iscl_hsm.errors import ErrorCode, KeyHolderError

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "PURPOSE_ALGORITHMS",
    "Algorithm",
    "ComponentError",
    "algorithm_for",
    "check_key",
    "combine",
    "format_hex",
    "kcv_of",
    "parse_component",
    "parse_kcv",
    "split",
]


@dataclass(frozen=True)
class Algorithm:
    """A key algorithm a ceremony can create: its name, its length in bytes and its family."""

    name: str
    length: int
    family: str  # "des" or "aes"

    @property
    def hex_digits(self) -> int:
        return 2 * self.length


ALGORITHMS: Final = {
    a.name: a
    for a in (
        Algorithm("des", 8, "des"),
        Algorithm("des2", 16, "des"),
        Algorithm("des3", 24, "des"),
        Algorithm("aes128", 16, "aes"),
        Algorithm("aes256", 32, "aes"),
    )
}
PURPOSE_ALGORITHMS: Final = {
    "auth": ("des", "des2", "des3"),
    "enc": ("des", "des2", "des3"),
    "transport": ("aes256", "aes128"),
}
"""ISCL V1.00 authentication and encryption keys are DES; transport keys wrap with AES (RFC 5649)."""
DEFAULT_ALGORITHM: Final = {"auth": "des", "enc": "des", "transport": "aes256"}


class ComponentError(KeyHolderError):
    """A component or a combined key was refused (the message says which and why); NOT_CONFIRMED when
    a custodian did not confirm it."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_OPTION) -> None:
        super().__init__(message, code)


def algorithm_for(purpose: str, name: str | None) -> Algorithm:
    """The algorithm ``name`` (default: the purpose's) after checking it suits ``purpose``."""
    name = name or DEFAULT_ALGORITHM[purpose]
    if name not in ALGORITHMS:
        raise ComponentError(f"unknown algorithm {name!r}; use one of {', '.join(ALGORITHMS)}")
    if name not in PURPOSE_ALGORITHMS[purpose]:
        raise ComponentError(
            f"a {purpose} key cannot be {name}: use {' or '.join(PURPOSE_ALGORITHMS[purpose])}"
            + (" (ISCL V1.00 authenticates and encrypts with DES)" if purpose != "transport" else "")
        )
    return ALGORITHMS[name]


def kcv_of(algorithm: Algorithm, key: bytes) -> bytes:
    """The 3-byte key check value of ``key`` (see the module docstring)."""
    if len(key) != algorithm.length:
        raise ComponentError(f"a {algorithm.name} key is {algorithm.length} bytes long, not {len(key)}")
    if algorithm.family == "des":
        return des_kcv(key)
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return (encryptor.update(bytes(16)) + encryptor.finalize())[:3]


def format_hex(value: bytes, group: int = 4) -> str:
    """Upper-case hex in groups of ``group`` digits, the way a custodian reads it aloud."""
    digits = value.hex().upper()
    return " ".join(digits[i : i + group] for i in range(0, len(digits), group))


def parse_kcv(text: str) -> bytes:
    """A KCV typed by a person: 6 hex digits, spaces allowed."""
    cleaned = "".join(text.split())
    try:
        value = bytes.fromhex(cleaned)
    except ValueError:
        raise ComponentError(f"the check value {text!r} is not hexadecimal; a KCV is 6 hex digits") from None
    if len(value) != 3:
        raise ComponentError(f"the check value {text!r} is not 6 hex digits long")
    return value


def parse_component(text: str, algorithm: Algorithm, number: int, *, fix: bool = False) -> tuple[bytes, str]:
    """Parse component ``number`` (hex, spaces allowed) and check it; return (value, note).

    ``note`` is "" or says what was adjusted (DES parity when ``fix``); a component with wrong
    parity and no ``fix``, a weak one, or a malformed one raises :class:`ComponentError`.
    """
    what = f"component {number}"
    cleaned = "".join(text.split())
    if not cleaned:
        raise ComponentError(f"{what} is empty; type its {algorithm.hex_digits} hex digits")
    if any(c not in "0123456789abcdefABCDEF" for c in cleaned):
        raise ComponentError(
            f"{what} is not hexadecimal: use only the digits 0-9 and A-F (spaces are ignored)"
        )
    if len(cleaned) != algorithm.hex_digits:
        raise ComponentError(
            f"{what} has {len(cleaned)} hex digits; a {algorithm.name} component has {algorithm.hex_digits}"
        )
    value = bytes.fromhex(cleaned)
    note = ""
    if algorithm.family == "des":
        if not has_odd_parity(value):
            wrong = [str(i + 1) for i, b in enumerate(value) if b.bit_count() % 2 == 0]
            if not fix:
                raise ComponentError(
                    f"{what} has wrong DES parity in byte {', '.join(wrong)} (each byte needs an odd number"
                    " of 1 bits); check the digits, or pass --fix-parity to adjust them"
                )
            value = fix_parity(value)
            note = f"{what}: DES parity fixed in byte {', '.join(wrong)}"
        if is_weak(value):
            raise ComponentError(f"{what} is a weak or semi-weak DES key; use another component")
    elif not any(value):
        raise ComponentError(f"{what} is all zeros; use another component")
    return value, note


def check_key(algorithm: Algorithm, key: bytes, what: str = "the combined key") -> None:
    """Refuse a key no ceremony should produce (weak DES, degenerate triple DES, all zeros)."""
    if algorithm.family == "des":
        if is_weak(key):
            raise ComponentError(f"{what} is a weak or semi-weak DES key; start again with new components")
        parts = [key[i : i + 8] for i in range(0, len(key), 8)]
        if len(parts) > 1 and (parts[0] == parts[1] or parts[-1] == parts[-2]):
            raise ComponentError(
                f"{what} has two equal adjacent 8-byte parts, which makes triple DES single DES;"
                " start again with new components"
            )
    elif not any(key):
        raise ComponentError(f"{what} is all zeros; start again with new components")


def combine(algorithm: Algorithm, components: list[bytes]) -> bytes:
    """The key: XOR of the components (parity-adjusted for DES), checked by :func:`check_key`."""
    if not 2 <= len(components) <= 3:
        raise ComponentError(f"a key is made of 2 or 3 components, not {len(components)}")
    key = bytearray(algorithm.length)
    for number, component in enumerate(components, 1):
        if len(component) != algorithm.length:
            raise ComponentError(f"component {number} is {len(component)} bytes long, not {algorithm.length}")
        for i, b in enumerate(component):
            key[i] ^= b
    result = fix_parity(bytes(key)) if algorithm.family == "des" else bytes(key)
    check_key(algorithm, result)
    return result


def split(algorithm: Algorithm, count: int) -> tuple[bytes, list[bytes]]:
    """A fresh random key and ``count`` random components of it: (key, components)."""
    if not 2 <= count <= 3:
        raise ComponentError(f"a key is made of 2 or 3 components, not {count}")
    while True:
        components: list[bytes] = []
        while len(components) < count:
            value = secrets.token_bytes(algorithm.length)
            try:
                value, _ = parse_component(value.hex(), algorithm, len(components) + 1, fix=True)
                check_key(algorithm, value, "a component")
            except ComponentError:
                continue  # a weak random component: vanishingly rare, draw again
            components.append(value)
        try:
            return combine(algorithm, components), components
        except ComponentError:
            continue
