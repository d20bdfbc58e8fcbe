"""The virtual card's applet, APDU in and response out, without sockets or pcscd.

Each test drives :class:`IsclApplet` with the bytes a host sends and checks the exact status word
(and data) a real ISCL card must answer, as docs/smart-cards.md specifies.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from iscl_hsm.cardsim.applet import IsclApplet
from iscl_hsm.cardsim.state import CardState
from iscl_hsm.crypto.des import DesKey, fix_parity
from iscl_hsm.errors import KeyHolderError
from iscl_hsm.keyholder import apdu
from iscl_hsm.keyholder.apdu import AID, Command, Ins, Pin, Sw
from iscl_hsm.shared import doc_reference

USER_PIN, SO_PIN = "1234", "87654321"
AUTH_1 = fix_parity(bytes.fromhex("0123456789ABCDEF"))
ENC_2 = fix_parity(bytes.fromhex("FEDCBA9876543210"))
AUTH_3_DES3 = fix_parity(bytes.fromhex("0123456789ABCDEF23456789ABCDEF01456789ABCDEF0123"))


def run(applet: IsclApplet, command: bytes) -> tuple[bytes, int]:
    response = applet.process(command)
    return response[:-2], int.from_bytes(response[-2:], "big")


def select() -> bytes:
    return apdu.command(Ins.SELECT, apdu.SELECT_BY_NAME, apdu.SELECT_NO_RESPONSE_DATA, AID)


def verify(pin: str, reference: Pin = Pin.USER) -> bytes:
    return apdu.command(Ins.VERIFY, 0, reference, apdu.pin_block(pin))


def internal(purpose: str, index: int, block: bytes) -> bytes:
    return apdu.command(Ins.INTERNAL_AUTHENTICATE, 0, apdu.key_reference(purpose, index), block, le=8)


def external(index: int, cryptogram: bytes) -> bytes:
    return apdu.command(Ins.EXTERNAL_AUTHENTICATE, 0, apdu.key_reference("auth", index), cryptogram)


GET_CHALLENGE = apdu.command(Ins.GET_CHALLENGE, le=8)


@pytest.fixture
def state(tmp_path: Path) -> CardState:
    card = CardState.new(USER_PIN, SO_PIN)
    card.set_key("auth", 1, AUTH_1)
    card.set_key("enc", 2, ENC_2)
    card.set_key("auth", 3, AUTH_3_DES3)
    card.create(tmp_path / "card.json")
    return card


@pytest.fixture
def applet(state: CardState) -> IsclApplet:
    return IsclApplet(state)


@pytest.fixture
def opened(applet: IsclApplet) -> IsclApplet:
    """Selected, card-holder PIN verified."""
    assert run(applet, select()) == (b"", Sw.OK)
    assert run(applet, verify(USER_PIN)) == (b"", Sw.OK)
    return applet


# --- selection and malformed commands ----------------------------------------------------------


def test_commands_before_select_find_no_application(applet: IsclApplet) -> None:
    assert run(applet, GET_CHALLENGE) == (b"", Sw.APPLICATION_NOT_FOUND)
    assert run(applet, verify(USER_PIN)) == (b"", Sw.APPLICATION_NOT_FOUND)


def test_select_of_another_aid_fails(applet: IsclApplet) -> None:
    other = apdu.command(Ins.SELECT, apdu.SELECT_BY_NAME, 0x0C, bytes.fromhex("A000000003000000"))
    assert run(applet, other) == (b"", Sw.APPLICATION_NOT_FOUND)
    assert run(applet, GET_CHALLENGE) == (b"", Sw.APPLICATION_NOT_FOUND)


@pytest.mark.parametrize(
    ("command", "sw"),
    [
        (b"\x00\x84", Sw.WRONG_LENGTH),  # shorter than a header
        (b"\x00\x88\x00\x81\x08\x01\x02", Sw.WRONG_LENGTH),  # Lc says 8, 2 bytes follow
        (bytes([0x00, 0x12, 0, 0]), Sw.INS_NOT_SUPPORTED),
        (bytes([0x80, Ins.GET_CHALLENGE, 0, 0, 8]), Sw.CLA_NOT_SUPPORTED),
        (bytes([0x00, Ins.PUT_KEY, 0, 0x81, 8]) + bytes(8), Sw.CLA_NOT_SUPPORTED),
        (apdu.command(Ins.GET_CHALLENGE, le=16), Sw.WRONG_LENGTH),
        (apdu.command(Ins.GET_CHALLENGE, 1, 0, le=8), Sw.WRONG_P1_P2),
        (apdu.command(Ins.VERIFY, 0, 0x83, apdu.pin_block("1234")), Sw.WRONG_P1_P2),
        (apdu.command(Ins.VERIFY, 0, Pin.USER, b"1234"), Sw.WRONG_LENGTH),
        (apdu.command(Ins.INTERNAL_AUTHENTICATE, 0, 0x89, bytes(8), le=8), Sw.WRONG_P1_P2),
        (apdu.command(Ins.INTERNAL_AUTHENTICATE, 0, 0x01, bytes(8), le=8), Sw.WRONG_P1_P2),
        (apdu.command(Ins.INTERNAL_AUTHENTICATE, 0, 0x81, bytes(7), le=8), Sw.WRONG_LENGTH),
        (apdu.command(Ins.EXTERNAL_AUTHENTICATE, 0, apdu.key_reference("enc", 2), bytes(8)), Sw.WRONG_P1_P2),
    ],
)
def test_malformed_commands_get_their_status_word(opened: IsclApplet, command: bytes, sw: Sw) -> None:
    assert run(opened, command) == (b"", sw)


# --- PINs ------------------------------------------------------------------------------------------


def test_keys_need_the_card_holder_pin(applet: IsclApplet) -> None:
    run(applet, select())
    assert run(applet, internal("auth", 1, bytes(8))) == (b"", Sw.SECURITY_STATUS_NOT_SATISFIED)
    assert run(applet, apdu.command(Ins.VERIFY, 0, Pin.USER)) == (b"", 0x63C3)  # state query: not verified
    run(applet, verify(USER_PIN))
    assert run(applet, apdu.command(Ins.VERIFY, 0, Pin.USER)) == (b"", Sw.OK)


def test_wrong_pins_count_down_then_block_and_persist(applet: IsclApplet, state: CardState) -> None:
    run(applet, select())
    assert run(applet, verify("0000")) == (b"", 0x63C2)
    assert run(applet, verify("0000")) == (b"", 0x63C1)
    assert state.path is not None
    assert json.loads(state.path.read_text())["pins"]["user"]["tries_left"] == 1
    assert run(applet, verify("0000")) == (b"", Sw.BLOCKED)
    assert run(applet, verify(USER_PIN)) == (b"", Sw.BLOCKED)  # even the right PIN now
    assert run(applet, apdu.command(Ins.VERIFY, 0, Pin.USER)) == (b"", Sw.BLOCKED)
    assert run(applet, internal("auth", 1, bytes(8))) == (b"", Sw.BLOCKED)
    # Blocked after a restart too: the counter lives in the file.
    reloaded = IsclApplet(CardState.load(state.path))
    run(reloaded, select())
    assert run(reloaded, verify(USER_PIN)) == (b"", Sw.BLOCKED)


def test_a_right_pin_resets_the_counter(applet: IsclApplet, state: CardState) -> None:
    run(applet, select())
    run(applet, verify("0000"))
    assert run(applet, verify(USER_PIN)) == (b"", Sw.OK)
    assert state.pins["user"].tries_left == 3


def test_the_so_unblocks_the_card_holder_pin(applet: IsclApplet) -> None:
    run(applet, select())
    for _ in range(3):
        run(applet, verify("0000"))
    reset = apdu.command(Ins.RESET_RETRY_COUNTER, 0, Pin.USER, apdu.pin_block("9999") + apdu.pin_block("5678"))
    assert run(applet, reset) == (b"", 0x63C2)  # wrong SO PIN
    reset = apdu.command(Ins.RESET_RETRY_COUNTER, 0, Pin.USER, apdu.pin_block(SO_PIN) + apdu.pin_block("5678"))
    assert run(applet, reset) == (b"", Sw.OK)
    assert run(applet, verify(USER_PIN)) == (b"", 0x63C2)
    assert run(applet, verify("5678")) == (b"", Sw.OK)


def test_change_reference_data_needs_the_current_pin(applet: IsclApplet, state: CardState) -> None:
    run(applet, select())
    change = apdu.command(Ins.CHANGE_REFERENCE_DATA, 0, Pin.USER, apdu.pin_block("0000") + apdu.pin_block("4321"))
    assert run(applet, change) == (b"", 0x63C2)
    change = apdu.command(Ins.CHANGE_REFERENCE_DATA, 0, Pin.USER, apdu.pin_block(USER_PIN) + apdu.pin_block("4321"))
    assert run(applet, change) == (b"", Sw.OK)
    assert state.path is not None
    reloaded = IsclApplet(CardState.load(state.path))
    run(reloaded, select())
    assert run(reloaded, verify(USER_PIN)) == (b"", 0x63C2)
    assert run(reloaded, verify("4321")) == (b"", Sw.OK)


def test_a_new_pin_must_be_a_valid_pin(applet: IsclApplet) -> None:
    run(applet, select())
    bad_new = apdu.pin_block(USER_PIN) + b"12\xff\xff\xff\xff\xff\xff"  # two digits: too short
    assert run(applet, apdu.command(Ins.CHANGE_REFERENCE_DATA, 0, Pin.USER, bad_new)) == (b"", Sw.WRONG_DATA)


# --- challenges and authentication ----------------------------------------------------------------


def test_internal_authenticate_is_des_ecb_of_the_block(opened: IsclApplet) -> None:
    block = os.urandom(8)
    assert run(opened, internal("auth", 1, block)) == (DesKey(AUTH_1).encrypt_ecb(block), Sw.OK)
    assert run(opened, internal("enc", 2, block)) == (DesKey(ENC_2).encrypt_ecb(block), Sw.OK)
    assert run(opened, internal("auth", 3, block)) == (DesKey(AUTH_3_DES3).encrypt_ecb(block), Sw.OK)


def test_a_missing_key_slot_is_reference_not_found(opened: IsclApplet) -> None:
    assert run(opened, internal("auth", 2, bytes(8))) == (b"", Sw.REFERENCE_NOT_FOUND)
    assert run(opened, internal("enc", 1, bytes(8))) == (b"", Sw.REFERENCE_NOT_FOUND)
    assert run(opened, external(8, bytes(8))) == (b"", Sw.REFERENCE_NOT_FOUND)


def test_external_authenticate_checks_the_last_challenge_once(opened: IsclApplet) -> None:
    challenge, sw = run(opened, GET_CHALLENGE)
    assert sw == Sw.OK and len(challenge) == 8
    cryptogram = DesKey(AUTH_1).encrypt_ecb(challenge)
    run(opened, internal("enc", 2, os.urandom(8)))  # a derivation in between keeps the challenge
    assert run(opened, external(1, cryptogram)) == (b"", Sw.OK)
    assert run(opened, external(1, cryptogram)) == (b"", Sw.CONDITIONS_NOT_SATISFIED)  # replayed


def test_a_wrong_cryptogram_fails_and_consumes_the_challenge(opened: IsclApplet) -> None:
    challenge, _ = run(opened, GET_CHALLENGE)
    cryptogram = DesKey(AUTH_1).encrypt_ecb(challenge)
    assert run(opened, external(1, bytes(a ^ 1 for a in cryptogram))) == (b"", Sw.AUTHENTICATION_FAILED)
    assert run(opened, external(1, cryptogram)) == (b"", Sw.CONDITIONS_NOT_SATISFIED)


def test_only_the_newest_challenge_counts(opened: IsclApplet) -> None:
    first, _ = run(opened, GET_CHALLENGE)
    second, _ = run(opened, GET_CHALLENGE)
    assert first != second
    assert run(opened, external(1, DesKey(AUTH_1).encrypt_ecb(first))) == (b"", Sw.AUTHENTICATION_FAILED)


def test_external_authenticate_without_a_challenge(opened: IsclApplet) -> None:
    assert run(opened, external(1, bytes(8))) == (b"", Sw.CONDITIONS_NOT_SATISFIED)
    assert run(opened, external(8, bytes(8))) == (b"", Sw.REFERENCE_NOT_FOUND)  # a missing key says so first


def test_power_off_forgets_pin_and_challenge(opened: IsclApplet) -> None:
    challenge, _ = run(opened, GET_CHALLENGE)
    opened.power_off()
    assert run(opened, GET_CHALLENGE) == (b"", Sw.APPLICATION_NOT_FOUND)
    run(opened, select())
    assert run(opened, external(1, DesKey(AUTH_1).encrypt_ecb(challenge))) == (
        b"", Sw.SECURITY_STATUS_NOT_SATISFIED
    )  # fmt: skip
    run(opened, verify(USER_PIN))
    assert run(opened, external(1, DesKey(AUTH_1).encrypt_ecb(challenge))) == (b"", Sw.CONDITIONS_NOT_SATISFIED)


# --- key loading -----------------------------------------------------------------------------------


def test_put_key_needs_the_so_pin_and_answers_the_kcv(opened: IsclApplet, state: CardState) -> None:
    key = fix_parity(os.urandom(16))
    put = apdu.command(Ins.PUT_KEY, 0, apdu.key_reference("enc", 5), key)
    assert run(opened, put) == (b"", Sw.SECURITY_STATUS_NOT_SATISFIED)  # the user PIN is not enough
    assert run(opened, verify(SO_PIN, Pin.SO)) == (b"", Sw.OK)
    assert run(opened, put) == (DesKey(key).kcv, Sw.OK)
    assert state.path is not None
    assert CardState.load(state.path).key("enc", 5) == key
    assert run(opened, internal("enc", 5, bytes(8))) == (DesKey(key).encrypt_ecb(bytes(8)), Sw.OK)


def test_put_key_refuses_bad_lengths(opened: IsclApplet) -> None:
    run(opened, verify(SO_PIN, Pin.SO))
    assert run(opened, apdu.command(Ins.PUT_KEY, 0, 0x81, bytes(12))) == (b"", Sw.WRONG_LENGTH)


def test_an_empty_put_key_tells_a_card_that_loads_keys(opened: IsclApplet, state: CardState) -> None:
    """'iscl card load-key' asks first with an empty PUT KEY: 6700 here, 6A81 from a card on a token."""
    assert run(opened, apdu.command(Ins.PUT_KEY, 0, 0x81)) == (b"", Sw.WRONG_LENGTH)
    assert state.key("auth", 1) == AUTH_1


def test_a_card_that_cannot_write_its_file_answers_6f00(opened: IsclApplet, state: CardState, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    run(opened, verify(SO_PIN, Pin.SO))
    state.path = tmp_path / "gone" / "card.json"
    assert run(opened, apdu.command(Ins.PUT_KEY, 0, 0x85, AUTH_1)) == (b"", Sw.NO_PRECISE_DIAGNOSIS)
    assert f"answering 6F00 to PUT_KEY 80 D8 00 85: cannot write the virtual card file {state.path}" in caplog.text
    assert AUTH_1.hex() not in caplog.text.lower()


# --- the state file ---------------------------------------------------------------------------------


def test_the_file_keeps_no_pin_in_clear(state: CardState) -> None:
    assert state.path is not None
    pins = json.dumps(json.loads(state.path.read_text())["pins"]).upper()
    for pin in (USER_PIN, SO_PIN):
        assert pin not in pins and apdu.pin_block(pin).hex().upper() not in pins
    assert oct(state.path.stat().st_mode & 0o777) == "0o600"
    assert AUTH_1.hex() not in repr(state) and "salt" not in repr(state.pins["user"])


def test_a_malformed_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": "iscl-virtual-card/1", "atr": "3B80800101", "pins": {}, "keys": {}}))
    with pytest.raises(KeyHolderError) as info:
        CardState.load(path)
    assert str(info.value).startswith(
        f"the virtual card file {path} is malformed (it needs a 'user' and an 'so' PIN); see"
        f" {doc_reference('smart-cards.md')} for the format"
    )
    with pytest.raises(KeyHolderError, match=r"cannot read the virtual card file .*: No such file"):
        CardState.load(tmp_path / "missing.json")


def test_command_parsing_cases() -> None:
    assert Command.parse(bytes([0, 0x84, 0, 0, 8])) == Command(0, 0x84, 0, 0, b"", 8)
    assert Command.parse(bytes([0, 0x20, 0, 0x81])) == Command(0, 0x20, 0, 0x81, b"", None)
    assert Command.parse(bytes([0, 0x88, 0, 0x81, 2, 1, 2, 0])) == Command(0, 0x88, 0, 0x81, b"\1\2", 256)
    assert apdu.parse_key_reference(0x91) == ("enc", 1) and apdu.parse_key_reference(0x88) == ("auth", 8)
    assert apdu.parse_key_reference(0x89) is None and apdu.parse_key_reference(0x11) is None


def test_the_documented_table_matches_the_code() -> None:
    """docs/smart-cards.md's command table and apdu.py must not drift apart."""
    table = (Path(__file__).resolve().parents[2] / "docs" / "smart-cards.md").read_text()
    rows = {}
    for line in table.splitlines():
        cells = [c.strip().strip("`") for c in line.split("|")[1:-1]]
        if len(cells) == 9 and len(cells[2]) == 2 and cells[2] != "--":
            rows[cells[0].split(" (")[0].replace(" ", "_")] = (int(cells[1], 16), int(cells[2], 16))
    assert rows == {ins.name: (0x80 if ins is Ins.PUT_KEY else 0x00, ins.value) for ins in Ins}
    assert AID.hex(" ").upper() in table
    assert "`81`..`88`, enc `91`..`98`" in table
    assert [apdu.key_reference("auth", 1), apdu.key_reference("auth", 8)] == [0x81, 0x88]
    assert [apdu.key_reference("enc", 1), apdu.key_reference("enc", 8)] == [0x91, 0x98]
