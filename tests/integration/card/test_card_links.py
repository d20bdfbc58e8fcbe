"""Whole ISCL links with keys on virtual IC cards, through a real pcscd and vsmartcard's reader.

Three mixes: a card client with a SoftHSM2 server (every suite), a SoftHSM2 client with a card
server, and card to card (the two vpcd readers). The cards hold HOSPITAL_KEYS, like the hospitals'
tokens. Unhappy paths check the exact error at the card's end and an aborted link at the peer.

What both wire profiles share runs under both, with the settings a card link has in each
(conftest.card_config: unique session keys under V1.00, which uses encryption key N itself and so
cannot take it from a card). Where the profiles differ (which APDUs a handshake sends, when a
missing encryption key is noticed) a test is pinned to its profile or expects each profile's answer.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import pytest

from iscl_hsm import wire
from iscl_hsm.cardsim.daemon import PrivatePcscd
from iscl_hsm.crypto.des import DesKey
from iscl_hsm.engine import Config, Connection, Profile, Role
from iscl_hsm.errors import ErrorCode, KeyHolderError, RemoteProtocolError
from iscl_hsm.keyholder import apdu
from iscl_hsm.keyholder.apdu import Ins, Sw
from iscl_hsm.keyholder.base import KeyHolder, RecordKey
from iscl_hsm.keyholder.smartcard import SmartCardKeyHolder
from iscl_hsm.transport.blocking import IsclSocket
from iscl_hsm.wire import Encryption, Mac

from ..conftest import HOSPITAL_KEYS, STRANGER_AUTH_1, SUITES, Hospitals
from ..test_transport_blocking import run_link
from .conftest import (
    USER_PIN,
    CardRack,
    VirtualCard,
    card_config,
    card_state,
    card_suites,
    session_derivations,
)

READER_0 = "Virtual PCD 00 00"
SUBSET = [p for p in SUITES if p.id in ("DES_CBC-DES_MAC-key1", "DES_CBC-MD5-session", "NONE-NONE-key1")]
"""A representative subset: the default suite, unique session keys, and no protection at all."""
CARD_SUITES = card_suites(SUITES)
CARD_SUBSET = card_suites(SUBSET)
"""SUITES and SUBSET in each profile, as (profile, encryption, mac, enc key id) of a card link."""


def exchange(config: Config, sizes: tuple[int, ...] = (0, 1, 4096, 70_000)) -> tuple[Any, Any, list[bytes]]:
    """Scripts for a link that carries messages both ways; returns (server, client, messages)."""
    messages = [os.urandom(n) for n in sizes]

    def server(link: IsclSocket) -> list[bytes | None]:
        got = [link.recv() for _ in messages]
        for data in messages:
            link.send(data)
        return got

    def client(link: IsclSocket) -> list[bytes | None]:
        for data in messages:
            link.send(data)
        return [link.recv() for _ in messages]

    return server, client, messages


def assert_link_carries(server_holder: KeyHolder, client_holder: KeyHolder, config: Config) -> None:
    server_script, client_script, messages = exchange(config)
    server, client = run_link(server_holder, client_holder, server_script, client_script, config, config)
    assert server.get() == messages
    assert client.get() == messages


# --- the three mixes -----------------------------------------------------------------------------


@pytest.mark.parametrize(("profile", "encryption", "mac", "enc_key_id"), CARD_SUITES)
def test_card_client_with_token_server_every_suite(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], cards: CardRack,
    card_holders: Callable[..., SmartCardKeyHolder], profile: Profile, encryption: Encryption, mac: Mac,
    enc_key_id: int,
) -> None:  # fmt: skip
    """Hospital A's encryption keys are host-readable; with V1.00 session keys it derives as the card does."""
    card = card_holders(cards.insert(0))
    assert_link_carries(holders(hospitals.a), card, card_config(profile, encryption, mac, enc_key_id))


@pytest.mark.parametrize(("profile", "encryption", "mac", "enc_key_id"), CARD_SUBSET)
def test_token_client_with_card_server(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], cards: CardRack,
    card_holders: Callable[..., SmartCardKeyHolder], profile: Profile, encryption: Encryption, mac: Mac,
    enc_key_id: int,
) -> None:  # fmt: skip
    """Key pair 5: under V1.00 session keys come from encryption key 5, the pair's, on both ends."""
    card = card_holders(cards.insert(1))
    config = card_config(profile, encryption, mac, enc_key_id, auth_key_id=5)
    assert_link_carries(card, holders(hospitals.b), config)


@pytest.mark.parametrize(("profile", "encryption", "mac", "enc_key_id"), CARD_SUBSET)
def test_card_to_card(
    cards: CardRack, card_holders: Callable[..., SmartCardKeyHolder], profile: Profile, encryption: Encryption,
    mac: Mac, enc_key_id: int,
) -> None:  # fmt: skip
    server, client = card_holders(cards.insert(0)), card_holders(cards.insert(1))
    assert server.description == "card in reader 'Virtual PCD 00 00'"
    assert client.description == "card in reader 'Virtual PCD 00 01'"
    assert_link_carries(server, client, card_config(profile, encryption, mac, enc_key_id))


@pytest.mark.parametrize("role", list(Role), ids=lambda role: role.value)
@pytest.mark.parametrize(("encryption", "mac"), [(Encryption.DES_CBC, Mac.DES_MAC), (Encryption.NONE, Mac.MD5)])
def test_a_v100_link_with_a_card_and_a_fixed_encryption_key_is_refused_at_start(
    cards: CardRack, card_holders: Callable[..., SmartCardKeyHolder], role: Role, encryption: Encryption, mac: Mac,
) -> None:  # fmt: skip
    """V1.00 would use encryption key 2 itself as the DES key; the card never gives it out.

    Refused when the link is made, before any byte is sent or any APDU is spent, at either end. Even
    encryption none needs the key when MD5 hides E_K(R) in its MAC. Hardened takes the same settings.
    """
    card = card_holders(cards.insert(0))
    before = card.channel.commands_sent
    settings: dict[str, Any] = {"encryption": encryption, "mac": mac, "enc_key_id": 2,
                                "md5_order": wire.Md5Order.ENCRYPT_RANDOM}  # fmt: skip
    with pytest.raises(KeyHolderError) as info:
        Connection(role, card, Config(profile=Profile.V100, **settings))
    assert info.value.code is ErrorCode.BAD_OPTION
    assert info.value.args[0] == (
        f"V1.00 links with encryption key 2 use that key itself as the DES key, and card in reader '{READER_0}'"
        " never gives a key out: use unique session keys (--enc-key-id session), which it derives for each"
        " message, or the hardened profile (--profile hardened)"
    )
    assert card.channel.commands_sent == before
    Connection(role, card, Config(profile=Profile.HARDENED, **settings))  # no error


def test_a_card_derives_the_same_record_keys_as_the_token(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], cards: CardRack,
    card_holders: Callable[..., SmartCardKeyHolder],
) -> None:  # fmt: skip
    card, token = card_holders(cards.insert(0)), holders(hospitals.a)
    block = os.urandom(8)
    assert card.internal_authenticate(2, block) == token.internal_authenticate(2, block)
    assert card.derive_key(7, block).encrypt_cbc(bytes(8), bytes(16)) == token.derive_key(7, block).encrypt_cbc(
        bytes(8), bytes(16)
    )


def test_one_card_serves_two_links_whose_challenges_overlap(
    cards: CardRack, card_holders: Callable[..., SmartCardKeyHolder],
) -> None:  # fmt: skip
    """The card keeps one challenge; an older one still outstanding is checked on the host, once."""
    card = card_holders(cards.insert(0))
    auth = DesKey(HOSPITAL_KEYS[("auth", 1)])
    first, second = card.get_challenge(1), card.get_challenge(1)
    assert card.external_authenticate(1, first, auth.encrypt_ecb(first))  # on the host
    assert card.external_authenticate(1, second, auth.encrypt_ecb(second))  # on the card
    assert not card.external_authenticate(1, first, auth.encrypt_ecb(first))  # used already


# --- PINs, keys, replay -------------------------------------------------------------------------------


def test_a_wrong_pin_says_how_many_tries_are_left(cards: CardRack) -> None:
    card = cards.insert(0)
    with pytest.raises(KeyHolderError) as info:
        SmartCardKeyHolder("000000", card.reader)
    assert info.value.code is ErrorCode.LOCAL_KEY_HOLDER
    assert info.value.args[0] == (
        f"wrong card-holder PIN for the card in reader '{READER_0}': 2 tries left before it blocks;"
        " check the PIN or PIN file"
    )
    assert "000000" not in str(info.value)
    assert card.state().pins["user"].tries_left == 2
    with SmartCardKeyHolder(USER_PIN, card.reader):  # the right PIN resets the counter
        pass
    assert card.state().pins["user"].tries_left == 3


def test_a_blocked_pin_stays_blocked(cards: CardRack) -> None:
    card = cards.insert(0)
    messages = []
    for _ in range(3):
        with pytest.raises(KeyHolderError) as info:
            SmartCardKeyHolder("000000", card.reader)
        messages.append(info.value.args[0])
    blocked = (
        f"the card-holder PIN of the card in reader '{READER_0}' is blocked (6983) after too many wrong"
        " entries; the security officer must unblock it with 'iscl card unblock-pin'"
    )
    assert messages[1].endswith("1 try left before it blocks; check the PIN or PIN file")
    assert messages[2] == blocked
    with pytest.raises(KeyHolderError) as info:
        SmartCardKeyHolder(USER_PIN, card.reader)
    assert info.value.args[0] == blocked


def test_wrong_key_in_the_card_fails_authentication_at_both_ends(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], cards: CardRack,
    card_holders: Callable[..., SmartCardKeyHolder], profile: Profile,
) -> None:  # fmt: skip
    card = card_holders(cards.insert(0, card_state(replace={("auth", 1): STRANGER_AUTH_1})))
    config = card_config(profile)
    server, client = run_link(holders(hospitals.a), card, lambda link: None, lambda link: None, config, config)
    server.failed(RemoteProtocolError, ErrorCode.AUTHENTICATION_FAILED)
    client.failed(RemoteProtocolError, ErrorCode.AUTHENTICATION_FAILED)


def test_a_missing_key_slot_is_named_and_aborts_the_link(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], cards: CardRack,
    card_holders: Callable[..., SmartCardKeyHolder], profile: Profile,
) -> None:  # fmt: skip
    card = card_holders(cards.insert(0, card_state(skip=(("auth", 3),))))
    config = card_config(profile, auth_key_id=3)
    server, client = run_link(holders(hospitals.a), card, lambda link: None, lambda link: None, config, config)
    error = client.failed(KeyHolderError, ErrorCode.KEY_NOT_FOUND)
    assert error.args[0] == (
        f"key not found: the card in reader '{READER_0}' holds no auth key 3 (6A88); load it with"
        " 'iscl card load-key'"
    )
    server.failed(RemoteProtocolError, ErrorCode.REMOTE_KEY_HOLDER)


NO_ENC_KEY_1 = "holds no enc key 1 (6A88); load it with 'iscl card load-key'"


def test_a_card_server_without_the_encryption_key_naks_the_client_during_the_handshake(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], cards: CardRack,
    card_holders: Callable[..., SmartCardKeyHolder],
) -> None:  # fmt: skip
    """Hardened only: its handshake MACs need a key derived from encryption key 1, V1.00 has none."""
    card = card_holders(cards.insert(0, card_state(skip=(("enc", 1),))))
    config = card_config(Profile.HARDENED)
    server, client = run_link(card, holders(hospitals.b), lambda link: None, lambda link: None, config, config)
    assert server.failed(KeyHolderError, ErrorCode.KEY_NOT_FOUND).args[0].endswith(NO_ENC_KEY_1)
    # Whether the handshake-MAC key is derived ahead (prepare()) or when needed, the client is told.
    client.failed(RemoteProtocolError, ErrorCode.REMOTE_KEY_HOLDER)


def test_a_v100_card_server_without_the_encryption_key_fails_at_the_first_message(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], cards: CardRack,
    card_holders: Callable[..., SmartCardKeyHolder],
) -> None:  # fmt: skip
    """V1.00 only: its handshake needs no encryption key, and a session key is derived per message.

    The link comes up; the client's first message asks the server's card for its session key, which
    the card does not have: the server fails, the client is told, and nothing is delivered.
    """
    card = card_holders(cards.insert(0, card_state(skip=(("enc", 1),))))
    config = card_config(Profile.V100)
    received: list[bytes | None] = []
    server, client = run_link(card, holders(hospitals.b), lambda link: received.append(link.recv()),
                              lambda link: link.send(b"first"), config, config)  # fmt: skip
    assert server.failed(KeyHolderError, ErrorCode.KEY_NOT_FOUND).args[0].endswith(NO_ENC_KEY_1)
    client.failed(RemoteProtocolError, ErrorCode.REMOTE_KEY_HOLDER)
    assert received == []


def test_a_replayed_external_authenticate_fails(
    cards: CardRack, card_holders: Callable[..., SmartCardKeyHolder],
) -> None:  # fmt: skip
    holder = card_holders(cards.insert(0))
    channel = holder.channel
    challenge = channel.check(apdu.command(Ins.GET_CHALLENGE, le=8), "GET CHALLENGE", 8)
    command = apdu.command(
        Ins.EXTERNAL_AUTHENTICATE, 0, apdu.key_reference("auth", 1), DesKey(HOSPITAL_KEYS["auth", 1]).encrypt_ecb(challenge)
    )
    assert channel.transmit(command, "EXTERNAL AUTHENTICATE") == (b"", Sw.OK)
    assert channel.transmit(command, "EXTERNAL AUTHENTICATE") == (b"", Sw.CONDITIONS_NOT_SATISFIED)
    assert channel.status_error(Sw.CONDITIONS_NOT_SATISFIED, "EXTERNAL AUTHENTICATE", command).args[0] == (
        f"the card in reader '{READER_0}' has no challenge outstanding for EXTERNAL AUTHENTICATE (6985): another"
        " program reset the card or asked it for a new challenge; start the link again"
    )
    # Through the key-holder interface, a replay is refused before it reaches the card.
    auth = DesKey(HOSPITAL_KEYS["auth", 1])
    challenge = holder.get_challenge(1)
    assert holder.external_authenticate(1, challenge, auth.encrypt_ecb(challenge))
    assert not holder.external_authenticate(1, challenge, auth.encrypt_ecb(challenge))


# --- the card goes away -----------------------------------------------------------------------------


class PullingHolder(KeyHolder):
    """A card key holder whose card is pulled just before the ``nth`` call of ``method``; or, given
    ``fault``, which then does something else to it instead (stops pcscd, say)."""

    host_record_keys = True

    def __init__(self, holder: SmartCardKeyHolder, card: VirtualCard, method: str, nth: int = 1,
                 fault: Callable[[], object] | None = None) -> None:  # fmt: skip
        self.holder, self.card, self.method, self.left = holder, card, method, nth
        self.fault = fault or card.pull
        self.description = holder.description

    def _maybe_pull(self, method: str) -> None:
        if method == self.method:
            self.left -= 1
            if self.left == 0:
                self.fault()

    def get_challenge(self, key_id: int) -> bytes:
        self._maybe_pull("get_challenge")
        return self.holder.get_challenge(key_id)

    def internal_authenticate(self, key_id: int, block: bytes) -> bytes:
        self._maybe_pull("internal_authenticate")
        return self.holder.internal_authenticate(key_id, block)

    def external_authenticate(self, key_id: int, challenge: bytes, cryptogram: bytes) -> bool:
        self._maybe_pull("external_authenticate")
        return self.holder.external_authenticate(key_id, challenge, cryptogram)

    def derive_key(self, enc_key_id: int, block: bytes) -> RecordKey:
        self._maybe_pull("derive_key")
        return self.holder.derive_key(enc_key_id, block)


def removed(doing: str) -> str:
    return f"the card in reader '{READER_0}' was removed or powered off during {doing}; insert it and start again"


def test_card_pulled_during_the_handshake(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], cards: CardRack,
    card_holders: Callable[..., SmartCardKeyHolder], profile: Profile,
) -> None:  # fmt: skip
    card = cards.insert(0)
    pulling = PullingHolder(card_holders(card), card, "internal_authenticate")
    config = card_config(profile)
    server, client = run_link(holders(hospitals.a), pulling, lambda link: None, lambda link: None, config, config)
    assert client.failed(KeyHolderError, ErrorCode.LOCAL_KEY_HOLDER).args[0] == removed(
        "INTERNAL AUTHENTICATE with auth key 1"
    )
    server.failed(RemoteProtocolError, ErrorCode.REMOTE_KEY_HOLDER)


def test_card_pulled_from_a_server_during_the_handshake(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], cards: CardRack,
    card_holders: Callable[..., SmartCardKeyHolder], profile: Profile,
) -> None:  # fmt: skip
    card = cards.insert(0)
    pulling = PullingHolder(card_holders(card), card, "external_authenticate")
    config = card_config(profile)
    server, client = run_link(pulling, holders(hospitals.b), lambda link: None, lambda link: None, config, config)
    assert server.failed(KeyHolderError, ErrorCode.LOCAL_KEY_HOLDER).args[0] == removed("EXTERNAL AUTHENTICATE")
    client.failed(RemoteProtocolError, ErrorCode.REMOTE_KEY_HOLDER)


def test_card_pulled_during_a_transfer(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], cards: CardRack,
    card_holders: Callable[..., SmartCardKeyHolder], profile: Profile,
) -> None:  # fmt: skip
    """With unique session keys every message asks the card; the second message finds it gone."""
    card = cards.insert(0)
    config = card_config(profile, enc_key_id=wire.SESSION_KEYS)
    handshake, per_message = session_derivations(profile, config.mac)
    pulling = PullingHolder(card_holders(card), card, "derive_key", nth=handshake + per_message + 1)

    received: list[bytes | None] = []

    def server_script(link: IsclSocket) -> None:
        while True:
            received.append(link.recv())

    def client_script(link: IsclSocket) -> None:
        link.send(b"first")
        link.send(b"second")

    server, client = run_link(holders(hospitals.a), pulling, server_script, client_script, config, config)
    assert client.failed(KeyHolderError, ErrorCode.LOCAL_KEY_HOLDER).args[0] == removed(
        "INTERNAL AUTHENTICATE with enc key 1"
    )
    server.failed(RemoteProtocolError, ErrorCode.CONNECTION_LOST)
    assert received == [b"first"]


def test_pcscd_stopped_under_a_server(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], cards: CardRack, pcscd: PrivatePcscd,
    card_holders: Callable[..., SmartCardKeyHolder], profile: Profile,
) -> None:  # fmt: skip
    card = card_holders(cards.insert(0))
    pcscd.stop()
    config = card_config(profile)
    server, client = run_link(card, holders(hospitals.b), lambda link: None, lambda link: None, config, config)
    assert server.failed(KeyHolderError, ErrorCode.LOCAL_KEY_HOLDER).args[0] == (
        f"pcscd stopped while using the card in reader '{READER_0}' (GET CHALLENGE); start pcscd again"
        " (mkdir -p /run/pcscd; pcscd -f) and start again"
    )
    client.failed(RemoteProtocolError, ErrorCode.REMOTE_KEY_HOLDER)
    with pytest.raises(KeyHolderError) as info:
        SmartCardKeyHolder(USER_PIN, READER_0)
    assert info.value.args[0] == (
        "the PC/SC service pcscd is not running: start it (mkdir -p /run/pcscd; pcscd -f, or systemctl start"
        " pcscd.socket) and try again"
    )


# --- finding the card -----------------------------------------------------------------------------------


def test_reader_selection_errors(cards: CardRack) -> None:
    cards.insert(0)
    with pytest.raises(KeyHolderError) as info:
        SmartCardKeyHolder(USER_PIN, "PCD 00 01")
    assert info.value.args[0] == (
        "no card in reader 'Virtual PCD 00 01'; insert the ISCL card, or wait for it with --wait-card SECONDS"
    )
    with pytest.raises(KeyHolderError) as info:
        SmartCardKeyHolder(USER_PIN, "Gemalto")
    assert info.value.args[0] == (
        "no smart-card reader matches --reader 'Gemalto'; the readers are 'Virtual PCD 00 00', 'Virtual PCD 00 01'"
    )
    with pytest.raises(KeyHolderError) as info:
        SmartCardKeyHolder(USER_PIN, "Virtual")
    assert info.value.args[0] == (
        "--reader 'Virtual' matches several readers (Virtual PCD 00 00, Virtual PCD 00 01); give more of the name"
    )
    with SmartCardKeyHolder(USER_PIN) as holder:  # no --reader: the first reader holding a card
        assert holder.description == f"card in reader '{READER_0}'"


def test_no_card_anywhere(pcscd: PrivatePcscd) -> None:
    with pytest.raises(KeyHolderError) as info:
        SmartCardKeyHolder(USER_PIN, wait_card=0.3)
    assert info.value.args[0] == (
        "no reader holds a card within 0.3 s (readers: Virtual PCD 00 00, Virtual PCD 00 01); insert the ISCL"
        " card, name its reader with --reader, or wait with --wait-card SECONDS"
    )


def test_an_exclusive_connection_keeps_other_programs_out(
    cards: CardRack, card_holders: Callable[..., SmartCardKeyHolder],
) -> None:  # fmt: skip
    card = cards.insert(0)
    card_holders(card)
    with pytest.raises(KeyHolderError) as info:
        SmartCardKeyHolder(USER_PIN, card.reader)
    assert info.value.args[0] == (
        f"reader '{READER_0}' is in use by another program (an iscl server on this card?); stop it or name"
        " another reader"
    )


# --- the APDU trace -------------------------------------------------------------------------------------

HARDENED_CLIENT_TRACE = [
    "INTERNAL_AUTHENTICATE 00 88 00 81",  # pass 2: E_AK1(RS)
    "GET_CHALLENGE 00 84 00 00",  # pass 2: RC
    "INTERNAL_AUTHENTICATE 00 88 00 91",  # while the server works: the handshake-MAC key,
    "INTERNAL_AUTHENTICATE 00 88 00 91",  # then the record keys (cipher and MAC, each direction)
    "INTERNAL_AUTHENTICATE 00 88 00 91",
    "INTERNAL_AUTHENTICATE 00 88 00 91",
    "INTERNAL_AUTHENTICATE 00 88 00 91",
    "EXTERNAL_AUTHENTICATE 00 82 00 81",  # pass 3: the server's E_AK1(RC)
]
HARDENED_SERVER_TRACE = [
    "GET_CHALLENGE 00 84 00 00",  # pass 1: RS
    "INTERNAL_AUTHENTICATE 00 88 00 91",  # the handshake-MAC key, while the client works
    "EXTERNAL_AUTHENTICATE 00 82 00 81",  # pass 2: the client's E_AK1(RS)
    "INTERNAL_AUTHENTICATE 00 88 00 81",  # pass 3: E_AK1(RC)
    "INTERNAL_AUTHENTICATE 00 88 00 91",  # record keys while the client works: cipher and MAC,
    "INTERNAL_AUTHENTICATE 00 88 00 91",  # each direction
    "INTERNAL_AUTHENTICATE 00 88 00 91",
    "INTERNAL_AUTHENTICATE 00 88 00 91",
]
V100_CLIENT_TRACE = [
    "INTERNAL_AUTHENTICATE 00 88 00 81",  # pass 2: E_AK1(RS)
    "GET_CHALLENGE 00 84 00 00",  # pass 2: RC
    "EXTERNAL_AUTHENTICATE 00 82 00 81",  # pass 3: the server's E_AK1(RC)
    "INTERNAL_AUTHENTICATE 00 88 00 91",  # the message's session key parity(E_EK1(R)), to send it
]
V100_SERVER_TRACE = [
    "GET_CHALLENGE 00 84 00 00",  # pass 1: RS
    "EXTERNAL_AUTHENTICATE 00 82 00 81",  # pass 2: the client's E_AK1(RS)
    "INTERNAL_AUTHENTICATE 00 88 00 81",  # pass 3: E_AK1(RC)
    "INTERNAL_AUTHENTICATE 00 88 00 91",  # the message's session key, from the client's R, to read it
]
TRACES = {
    Profile.HARDENED: (HARDENED_SERVER_TRACE, HARDENED_CLIENT_TRACE),
    Profile.V100: (V100_SERVER_TRACE, V100_CLIENT_TRACE),
}
"""docs/smart-cards.md, "One handshake": (server, client) after SELECT and VERIFY, for a handshake and
one message from the client, DES-CBC + DES-MAC with key pair 1: hardened with encryption key 1,
V1.00 with unique session keys."""

HANDSHAKE_APDUS = {Profile.V100: 3, Profile.HARDENED: 8}
"""APDUs each side's card gets in one DES-CBC + DES-MAC handshake (measured): V1.00 GET CHALLENGE,
INTERNAL and EXTERNAL AUTHENTICATE; hardened those and five INTERNAL AUTHENTICATEs under encryption
key 1 (the handshake-MAC key and four record keys)."""
V100_APDU_BUDGET = 4
"""The V1.00 budget (issue 16): at most four APDUs per side per handshake with a card."""


def test_the_apdu_trace_of_one_handshake(
    cards: CardRack, card_holders: Callable[..., SmartCardKeyHolder], caplog: pytest.LogCaptureFixture,
    profile: Profile,
) -> None:  # fmt: skip
    server_card, client_card = cards.insert(0), cards.insert(1)
    config = card_config(profile)
    with caplog.at_level(logging.DEBUG, logger="iscl_hsm.keyholder.smartcard"):
        server, client = card_holders(server_card), card_holders(client_card)
        outcome = run_link(server, client, lambda link: link.recv(), lambda link: link.send(b"x"), config, config)
        assert outcome[0].get() == b"x"
    traces: dict[str, list[str]] = {server_card.reader: [], client_card.reader: []}
    for record in caplog.records:
        reader, _, entry = record.getMessage().partition(": ")
        command, _, sw = entry.rpartition(" -> ")
        assert sw == "9000", entry
        traces[reader].append(command)
    opening = ["SELECT 00 A4 04 0C", "VERIFY 00 20 00 81"]
    server_trace, client_trace = TRACES[profile]
    assert traces[server_card.reader] == opening + server_trace
    assert traces[client_card.reader] == opening + client_trace


def test_apdus_per_side_of_one_handshake(
    cards: CardRack, card_holders: Callable[..., SmartCardKeyHolder], profile: Profile,
) -> None:  # fmt: skip
    """CardChannel.commands_sent of each card, from the card's opening until its end of the link is up."""
    server, client = card_holders(cards.insert(0)), card_holders(cards.insert(1))
    opened = {card: card.channel.commands_sent for card in (server, client)}  # SELECT and VERIFY

    def at_link_up(card: SmartCardKeyHolder) -> Callable[[IsclSocket], int]:
        return lambda link: card.channel.commands_sent - opened[card]

    config = card_config(profile)
    outcome = run_link(server, client, at_link_up(server), at_link_up(client), config, config)
    per_side = (outcome[0].get(), outcome[1].get())
    assert per_side == (HANDSHAKE_APDUS[profile],) * 2
    if profile is Profile.V100:
        assert max(per_side) <= V100_APDU_BUDGET


def test_wait_card_waits_for_the_insertion(cards: CardRack) -> None:
    opened: list[Any] = []

    def open_when_inserted() -> None:
        try:
            opened.append(SmartCardKeyHolder(USER_PIN, "PCD 00 01", wait_card=60))
        except KeyHolderError as exc:
            opened.append(exc)

    waiter = threading.Thread(target=open_when_inserted)
    waiter.start()
    cards.insert(1)
    waiter.join(60)
    assert isinstance(opened[0], SmartCardKeyHolder), opened
    assert opened[0].description == "card in reader 'Virtual PCD 00 01'"
    opened[0].close()
