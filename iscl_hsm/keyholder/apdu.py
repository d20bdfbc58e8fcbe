"""The ISCL card application's APDUs: the one place both the host and the virtual card read them from.

docs/smart-cards.md has the same commands as a table for card issuers. Every command is ISO/IEC
7816-4 (CLA 00) except PUT KEY (CLA 80), which only provisioning uses. Short APDUs only.

Key references (P2 of INTERNAL / EXTERNAL AUTHENTICATE and PUT KEY) follow ISO 7816-4: b8 = 1 means
"specific reference data", b5..b1 the number. Authentication key N is number N (P2 0x81..0x88),
encryption key N is number 0x10 + N (P2 0x91..0x98). PIN references (P2 of VERIFY, CHANGE REFERENCE
DATA, RESET RETRY COUNTER): 0x81 the card holder's PIN, 0x82 the security officer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final

AID: Final = bytes.fromhex("F0495343 4C01")
"""The ISCL application: F0 (ISO 7816-5 category F, proprietary, unregistered), "ISCL", version 01."""

CLA: Final = 0x00
CLA_PROPRIETARY: Final = 0x80
SELECT_BY_NAME: Final = 0x04
SELECT_NO_RESPONSE_DATA: Final = 0x0C
BLOCK: Final = 8
"""Challenges, INTERNAL AUTHENTICATE blocks and cryptograms are one DES block."""
KEY_LENGTHS: Final = (8, 16, 24)
"""Single DES, two-key and three-key triple DES."""
KCV_LENGTH: Final = 3
"""PUT KEY answers with the key check value of the key it stored."""


class Ins(IntEnum):
    SELECT = 0xA4
    VERIFY = 0x20
    CHANGE_REFERENCE_DATA = 0x24
    RESET_RETRY_COUNTER = 0x2C
    GET_CHALLENGE = 0x84
    INTERNAL_AUTHENTICATE = 0x88
    EXTERNAL_AUTHENTICATE = 0x82
    PUT_KEY = 0xD8  # CLA 80, proprietary


class Pin(IntEnum):
    USER = 0x81
    SO = 0x82


PIN_NAMES: Final = {Pin.USER: "card-holder PIN", Pin.SO: "security-officer PIN"}
MIN_PIN: Final = 4
MAX_PIN: Final = 8
PIN_PAD: Final = 0xFF


class Sw(IntEnum):
    """Status words (ISO/IEC 7816-4 section 5.6) the application returns."""

    OK = 0x9000
    AUTHENTICATION_FAILED = 0x6300
    MEMORY_FAILURE = 0x6581
    WRONG_LENGTH = 0x6700
    SECURITY_STATUS_NOT_SATISFIED = 0x6982
    BLOCKED = 0x6983
    CONDITIONS_NOT_SATISFIED = 0x6985
    WRONG_DATA = 0x6A80
    FUNCTION_NOT_SUPPORTED = 0x6A81
    APPLICATION_NOT_FOUND = 0x6A82
    WRONG_P1_P2 = 0x6A86
    REFERENCE_NOT_FOUND = 0x6A88
    INS_NOT_SUPPORTED = 0x6D00
    CLA_NOT_SUPPORTED = 0x6E00
    NO_PRECISE_DIAGNOSIS = 0x6F00


TRIES_LEFT: Final = 0x63C0
"""63Cx: verification failed, x tries left."""


def tries_left_sw(tries: int) -> int:
    return TRIES_LEFT | min(tries, 15)


def tries_left(sw: int) -> int | None:
    """x for a status word 63Cx, else None."""
    return sw & 0x0F if sw & 0xFFF0 == TRIES_LEFT else None


def key_reference(purpose: str, index: int) -> int:
    """P2 for key ``index`` 1..8 of ``purpose`` "auth" or "enc"."""
    if purpose not in ("auth", "enc") or not 1 <= index <= 8:
        raise ValueError(f"no card key reference for {purpose} key {index}")
    return 0x80 | (0x10 if purpose == "enc" else 0) | index


def parse_key_reference(p2: int) -> tuple[str, int] | None:
    """(purpose, index) for a key reference, or None if P2 names no ISCL key."""
    number = p2 & 0x7F
    if not p2 & 0x80 or not 1 <= number & 0x0F <= 8 or number & 0x60:
        return None
    return ("enc" if number & 0x10 else "auth"), number & 0x0F


def pin_block(pin: str) -> bytes:
    """The 8-byte VERIFY data: the PIN in ASCII, padded with FF (as in NIST SP 800-73)."""
    raw = pin.encode("ascii", "replace")
    if not MIN_PIN <= len(raw) <= MAX_PIN or not pin.isascii() or not pin.isprintable():
        raise ValueError(f"a card PIN is {MIN_PIN} to {MAX_PIN} printable ASCII characters")
    return raw + bytes([PIN_PAD]) * (MAX_PIN - len(raw))


def command(ins: Ins, p1: int = 0, p2: int = 0, data: bytes = b"", le: int | None = None) -> bytes:
    """A short command APDU (case 1..4); CLA 80 for PUT KEY, else 00."""
    cla = CLA_PROPRIETARY if ins is Ins.PUT_KEY else CLA
    apdu = bytes([cla, ins, p1, p2])
    if data:
        apdu += bytes([len(data)]) + data
    if le is not None:
        apdu += bytes([le & 0xFF])
    return apdu


@dataclass(frozen=True)
class Command:
    """A parsed short command APDU."""

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes
    le: int | None

    @classmethod
    def parse(cls, apdu: bytes) -> Command:
        """Raise ValueError when ``apdu`` is not a well-formed short APDU."""
        if len(apdu) < 4:
            raise ValueError("shorter than a header")
        cla, ins, p1, p2 = apdu[:4]
        body = apdu[4:]
        if not body:
            return cls(cla, ins, p1, p2, b"", None)
        if len(body) == 1:
            return cls(cla, ins, p1, p2, b"", body[0] or 256)
        lc = body[0]
        if lc == 0 or len(body) not in (1 + lc, 2 + lc):
            raise ValueError("Lc does not match the length")
        le = (body[-1] or 256) if len(body) == 2 + lc else None
        return cls(cla, ins, p1, p2, body[1 : 1 + lc], le)


def describe(apdu: bytes) -> str:
    """A command's name and header for traces, never its data (which may be a PIN or a key)."""
    name = Ins(apdu[1]).name if apdu[1] in Ins._value2member_map_ else f"INS {apdu[1]:02X}"
    return f"{name} {apdu[:4].hex(' ').upper()}"


_MEANINGS: Final = {
    Sw.AUTHENTICATION_FAILED: "the cryptogram does not match (the two ends hold different keys)",
    Sw.MEMORY_FAILURE: "the card could not write its memory",
    Sw.WRONG_LENGTH: "the command has the wrong length",
    Sw.SECURITY_STATUS_NOT_SATISFIED: "security status not satisfied: the PIN was not verified",
    Sw.BLOCKED: "the PIN or key is blocked",
    Sw.CONDITIONS_NOT_SATISFIED: "no challenge is outstanding (GET CHALLENGE must come first)",
    Sw.WRONG_DATA: "the command data is malformed",
    Sw.FUNCTION_NOT_SUPPORTED: "the card does not offer this function",
    Sw.APPLICATION_NOT_FOUND: "the card has no ISCL application",
    Sw.WRONG_P1_P2: "the card does not know that key or PIN reference",
    Sw.REFERENCE_NOT_FOUND: "key not found: the card holds no key under that reference",
    Sw.INS_NOT_SUPPORTED: "the card does not support this command",
    Sw.CLA_NOT_SUPPORTED: "the card does not support this class byte",
    Sw.NO_PRECISE_DIAGNOSIS: "the card failed internally (a virtual card logs why)",
}


def meaning(sw: int) -> str:
    """What a status word means, in words."""
    if (left := tries_left(sw)) is not None:
        return f"wrong PIN, {left} {'try' if left == 1 else 'tries'} left"
    if sw in Sw._value2member_map_ and (text := _MEANINGS.get(Sw(sw))):
        return text
    return "the card answered with an unexpected status"
