"""A virtual card whose keys stay in a SoftHSM2 token (`iscl card emulate --token`).

Its PINs, retry counters and challenge live in its card file; every DES operation is done by the
token. The card must answer exactly what a card holding the same keys answers, so it links with a
plain SoftHSM2 end, and its bytes are compared with host DES (OpenSSL) of HOSPITAL_KEYS.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from iscl_hsm.cardsim.applet import IsclApplet
from iscl_hsm.cardsim.keys import TokenKeys
from iscl_hsm.cardsim.state import CardState
from iscl_hsm.cli.main import EXIT_CONFIG
from iscl_hsm.crypto.des import DesKey, fix_parity
from iscl_hsm.engine import Profile
from iscl_hsm.errors import ErrorCode, KeyHolderError
from iscl_hsm.keyholder import apdu
from iscl_hsm.keyholder.apdu import Ins, Pin, Sw
from iscl_hsm.keyholder.base import KeyHolder
from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder
from iscl_hsm.keyholder.smartcard import SmartCardKeyHolder
from iscl_hsm.wire import Encryption, Mac

from ..conftest import HOSPITAL_KEYS, Hospitals
from ..test_cli import child_env, iscl, one_line
from .conftest import SO_PIN, USER_PIN, CardRack, VirtualCard, card_config, card_state, load_key
from .test_card_links import CARD_SUBSET, assert_link_carries

READER_0 = "Virtual PCD 00 00"


def internal(holder: SmartCardKeyHolder, purpose: str, index: int, block: bytes) -> bytes:
    """The card's raw answer to INTERNAL AUTHENTICATE (no parity, no host processing)."""
    command = apdu.command(Ins.INTERNAL_AUTHENTICATE, 0, apdu.key_reference(purpose, index), block, le=apdu.BLOCK)
    return holder.channel.check(command, "INTERNAL AUTHENTICATE", apdu.BLOCK)


@pytest.fixture
def token_card(hospitals: Hospitals, cards: CardRack) -> VirtualCard:
    """A card in reader 0 whose keys stay in hospital A's token."""
    return cards.insert_on_token(hospitals, hospitals.a, 0)


# --- over a real link ------------------------------------------------------------------------------


@pytest.mark.parametrize(("profile", "encryption", "mac", "enc_key_id"), CARD_SUBSET)
def test_a_card_on_a_token_links_with_a_plain_token(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], token_card: VirtualCard,
    card_holders: Callable[..., SmartCardKeyHolder], profile: Profile, encryption: Encryption, mac: Mac,
    enc_key_id: int,
) -> None:  # fmt: skip
    card = card_holders(token_card)
    config = card_config(profile, encryption, mac, enc_key_id)
    assert_link_carries(holders(hospitals.b), card, config)  # the card as client
    assert_link_carries(card, holders(hospitals.b), config)  # and as server


def test_the_card_on_a_token_answers_the_bytes_of_a_card_holding_the_keys(
    hospitals: Hospitals, cards: CardRack, token_card: VirtualCard,
    card_holders: Callable[..., SmartCardKeyHolder],
) -> None:  # fmt: skip
    """INTERNAL AUTHENTICATE under an encryption key is E_KE(block) exactly, low bits included."""
    on_token, in_file = card_holders(token_card), card_holders(cards.insert(1))
    for purpose, index in (("auth", 2), ("enc", 3), ("enc", 8)):
        block = os.urandom(8)
        expected = DesKey(HOSPITAL_KEYS[purpose, index]).encrypt_ecb(block)
        assert internal(on_token, purpose, index, block) == expected
        assert internal(in_file, purpose, index, block) == expected
    block = os.urandom(8)
    record_key = DesKey(fix_parity(DesKey(HOSPITAL_KEYS["enc", 5]).encrypt_ecb(block)))
    data = os.urandom(64)
    assert on_token.derive_key(5, block).encrypt_cbc(bytes(8), data) == record_key.encrypt_cbc(bytes(8), data)


def test_external_authenticate_on_a_token_checks_the_cryptogram_once(
    token_card: VirtualCard, card_holders: Callable[..., SmartCardKeyHolder],
) -> None:  # fmt: skip
    card = card_holders(token_card)
    auth = DesKey(HOSPITAL_KEYS["auth", 4])
    challenge = card.get_challenge(4)
    assert card.external_authenticate(4, challenge, auth.encrypt_ecb(challenge))
    assert not card.external_authenticate(4, challenge, auth.encrypt_ecb(challenge))  # used already
    challenge = card.get_challenge(4)
    wrong = bytes(b ^ 1 for b in auth.encrypt_ecb(challenge))
    assert not card.external_authenticate(4, challenge, wrong)


def test_a_key_missing_from_the_token_is_key_not_found(
    hospitals: Hospitals, cards: CardRack, card_holders: Callable[..., SmartCardKeyHolder]
) -> None:
    """The stranger's token lacks auth key 3: the card answers 6A88 and its log names the token."""
    virtual = cards.insert_on_token(hospitals, hospitals.stranger, 0)
    card = card_holders(virtual)
    with pytest.raises(KeyHolderError) as caught:
        card.internal_authenticate(3, bytes(8))
    assert caught.value.code == ErrorCode.KEY_NOT_FOUND
    assert str(caught.value).startswith(f"key not found: the card in reader '{READER_0}' holds no auth key 3 (6A88)")
    assert f"answering 6A88 (key not found): authentication key 3 (label 'iscl-auth-3') is not on PKCS#11 token" \
           f" '{hospitals.stranger.label}'" in virtual.log.read_text()  # fmt: skip


# --- what the applet does with a token, without pcscd --------------------------------------------------


@pytest.fixture
def token_applet(hospitals: Hospitals, tmp_path: Path) -> Iterator[tuple[IsclApplet, Pkcs11KeyHolder]]:
    state = CardState.new(USER_PIN, SO_PIN)
    state.create(tmp_path / "card.json")
    with hospitals.holder(hospitals.a) as holder:
        applet = IsclApplet(state, TokenKeys(holder))
        for command in (apdu.command(Ins.SELECT, apdu.SELECT_BY_NAME, apdu.SELECT_NO_RESPONSE_DATA, apdu.AID),
                        apdu.command(Ins.VERIFY, 0, Pin.USER, apdu.pin_block(USER_PIN)),
                        apdu.command(Ins.VERIFY, 0, Pin.SO, apdu.pin_block(SO_PIN))):  # fmt: skip
            assert applet.process(command) == b"\x90\x00"
        yield applet, holder


def test_put_key_on_a_token_card_is_function_not_supported(
    token_applet: tuple[IsclApplet, Pkcs11KeyHolder], tmp_path: Path
) -> None:
    applet, _ = token_applet
    for data in (HOSPITAL_KEYS["auth", 1], b""):  # a real key, and the empty probe of 'iscl card load-key'
        assert applet.process(apdu.command(Ins.PUT_KEY, 0, 0x81, data)) == Sw.FUNCTION_NOT_SUPPORTED.to_bytes(2, "big")
    assert CardState.load(tmp_path / "card.json").keys == {}


def test_a_token_failure_answers_6f00(token_applet: tuple[IsclApplet, Pkcs11KeyHolder]) -> None:
    applet, holder = token_applet
    holder.close()
    command = apdu.command(Ins.INTERNAL_AUTHENTICATE, 0, 0x81, bytes(8), le=8)
    assert applet.process(command) == Sw.NO_PRECISE_DIAGNOSIS.to_bytes(2, "big")


# --- the command line ----------------------------------------------------------------------------------


def test_load_key_onto_a_card_on_a_token_is_refused_before_the_ceremony(
    token_card: VirtualCard, pins: dict[str, Path], tmp_path: Path
) -> None:
    code, out, err = load_key(tmp_path, pins, "auth", 1, HOSPITAL_KEYS["auth", 1])
    assert code == 1
    assert one_line(err) == (
        f"iscl: the card in reader '{READER_0}' does not load keys (6A81); a virtual card on a token"
        " (iscl card emulate --token) keeps its keys in the token: load them there with 'iscl keys' instead"
        " [ISCL 102 LOCAL_KEY_HOLDER]"
    )
    assert "component" not in out
    assert token_card.state().pins["so"].tries_left == 3  # the SO PIN was not even tried


def test_emulate_refuses_a_card_file_that_holds_keys(hospitals: Hospitals, tmp_path: Path) -> None:
    card_file = tmp_path / "card.json"
    card_state().create(card_file)
    done = iscl("card", "emulate", "--card-file", card_file, "--port", 9, "--token", hospitals.a.label,
                "--pin-file", hospitals.pin_file(hospitals.a), env=child_env(hospitals))  # fmt: skip
    assert done.returncode == 1
    assert one_line(done.stderr) == (
        f"iscl: the virtual card file {card_file} holds keys, but with --token the card's keys stay in token"
        f" '{hospitals.a.label}': give a card file without keys (iscl card init) [ISCL 100 BAD_OPTION]"
    )


def test_emulate_names_a_missing_token(hospitals: Hospitals, tmp_path: Path) -> None:
    card_file = tmp_path / "card.json"
    CardState.new(USER_PIN, SO_PIN).create(card_file)
    done = iscl("card", "emulate", "--key-file", card_file, "--port", 9, "--token", "no-such-token",
                "--pin-file", hospitals.pin_file(hospitals.a), env=child_env(hospitals))  # fmt: skip
    assert done.returncode == EXIT_CONFIG
    assert one_line(done.stderr).startswith(
        "iscl: PKCS#11 token 'no-such-token' not found in module /usr/lib/softhsm/libsofthsm2.so (tokens present: "
    )


def test_emulate_without_a_token_takes_no_token_pin(tmp_path: Path) -> None:
    done = iscl("card", "emulate", "--card-file", tmp_path / "card.json", "--pin-file", tmp_path / "user.pin",
                env=child_env())  # fmt: skip
    assert one_line(done.stderr) == (
        "iscl: --pin-file opens the token of --token; the virtual card's own PINs are in its card file"
        " [ISCL 100 BAD_OPTION]"
    )


def test_token_record_keys_are_never_read_out(hospitals: Hospitals) -> None:
    with hospitals.holder(hospitals.a, record_keys="token") as holder, pytest.raises(KeyHolderError) as caught:
        holder.encrypt_blocks(1, [bytes(8)])
    assert str(caught.value) == (
        f"{holder.description} keeps record keys in the token (record_keys='token'), so derived values cannot"
        " be read out; open it with record_keys='host' [ISCL 100 BAD_OPTION]"
    )
