"""What only the V1.00 profile does: one transmission at a time, PS3.15's two MD5 orders, the SDK's
plain MD5, NAK codes read the SDK's way, one uniform authentication failure, and the profile check."""

from __future__ import annotations

import itertools
import struct

import pytest

from iscl_hsm import wire
from iscl_hsm.engine import (
    CloseRefused,
    Config,
    Connection,
    Md5Order,
    MessageReceived,
    MessageRefused,
    Profile,
    Role,
    State,
    check_key_holder,
)
from iscl_hsm.errors import ErrorCode, KeyHolderError, RemoteProtocolError
from iscl_hsm.keyholder.base import RecordKey
from iscl_hsm.keyholder.memory import MemoryKeyHolder
from iscl_hsm.wire import Encryption, Mac, MessageId
from tests.helpers import (
    AUTH_KEYS,
    ENC_KEYS,
    OTHER_KEY,
    ConnectionPair,
    Frame,
    cfg,
    everything_to_send,
    exchange,
    make_holder,
    other,
    reflecting_the_servers_challenge,
    split_frames,
)

V100 = Profile.V100
SUITES = list(itertools.product([Encryption.NONE, Encryption.DES_CBC], [Mac.NONE, Mac.MD5, Mac.DES_MAC],
                                [1, wire.SESSION_KEYS]))


def received(events: list[object]) -> list[bytes]:
    return [e.data for e in events if isinstance(e, MessageReceived)]


def ready(server: Config | None = None, client: Config | None = None, **kw: object) -> ConnectionPair:
    server = server or cfg(V100)
    p = ConnectionPair(server, client or server, **kw)  # type: ignore[arg-type]
    p.handshake()
    return p


def data_senders(p: ConnectionPair) -> list[Role]:
    """Who sent each data block, MAC and request, in wire order (the request marks a new message)."""
    kinds = (MessageId.MESSAGE_TRANSMISSION_NOTIF, MessageId.MAC_TRANSMISSION_NOTIF)
    return [r for r, f in p.sent if f.message_id in kinds]


# --- one transmission at a time ---------------------------------------------------------------------


@pytest.mark.parametrize(("encryption", "mac", "key_id"), SUITES, ids=str)
@pytest.mark.parametrize("prepare", [False, True], ids=["plain", "sealing-ahead"])
def test_crossing_requests_the_servers_message_goes_first(
    encryption: Encryption, mac: Mac, key_id: int, prepare: bool
) -> None:
    """Both ends ask at once: the server holds the client's request, the client answers the server's;
    the server's message is sent whole, then the client's, and both verify on the one shared chain."""
    config = cfg(V100, encryption=encryption, mac=mac, enc_key_id=key_id, max_block=16)
    p = ready(config, prepare=prepare)
    p.server.send_message(b"from the server, first")
    p.client.send_message(b"from the client, second")
    server_rq = p.server.data_to_send()
    client_rq = p.client.data_to_send()
    if prepare:
        p.client.prepare()  # the client seals ahead; the crossing makes it drop those blocks
    p.server.receive_data(client_rq)  # held
    assert p.server.inbound.name == "HELD" and p.sent_by(Role.SERVER, MessageId.MESSAGE_TRANSMISSION_RP) == []
    p.client.receive_data(server_rq)  # answered at once
    got = p.pump()
    assert received(got.client) == [b"from the server, first"]
    assert received(got.server) == [b"from the client, second"]
    senders = data_senders(p)
    assert senders == sorted(senders, key=lambda r: r is Role.CLIENT)  # every server frame before any client one
    assert p.server.idle and p.client.idle


def test_an_answer_that_overtakes_the_crossing_message_is_refused() -> None:
    """The server answers the client's held request only after its own MAC; an attacker who swaps the
    two would have the client start its message on the shared chain mid-message: refused (104)."""
    p = ready(cfg(V100, max_block=16))
    p.server.send_message(b"from the server, first")
    p.client.send_message(b"from the client, second")
    server_rq, client_rq = p.server.data_to_send(), p.client.data_to_send()
    p.server.receive_data(client_rq)  # held
    p.client.receive_data(server_rq)  # answered at once
    p.server.receive_data(p.client.data_to_send())
    frames = split_frames(everything_to_send(p.server))
    assert [f.message_id for f in frames[-2:]] == [MessageId.MAC_TRANSMISSION_NOTIF, MessageId.MESSAGE_TRANSMISSION_RP]
    swapped = b"".join(f.raw for f in [*frames[:-2], frames[-1], frames[-2]])
    with pytest.raises(RemoteProtocolError) as info:
        p.client.receive_data(swapped)
    assert info.value.code is ErrorCode.BAD_MESSAGE_ID and "before its own message was over" in str(info.value)


@pytest.mark.parametrize("key_id", [1, wire.SESSION_KEYS], ids=["key1", "session"])
def test_messages_both_ways_take_turns_whole(key_id: int) -> None:
    """Queued both ways at once, messages never interleave: each is sent whole before the next starts."""
    p = ready(cfg(V100, enc_key_id=key_id, max_block=8), prepare=True)
    exchange(p, [bytes([i]) * (100 + i) for i in range(4)], [bytes([0x80 + i]) * (90 + i) for i in range(4)])
    messages: list[set[Role]] = [set()]  # who sent the blocks and the MAC of each message, in wire order
    for role, f in p.sent:
        if f.message_id in (MessageId.MESSAGE_TRANSMISSION_NOTIF, MessageId.MAC_TRANSMISSION_NOTIF):
            messages[-1].add(role)
            if f.is_(MessageId.MAC_TRANSMISSION_NOTIF):
                messages.append(set())
    assert messages[-1] == set() and len(messages) == 9
    assert all(len(senders) == 1 for senders in messages[:-1]), "a message's blocks were interleaved with the other direction's"


def test_a_request_while_our_message_streams_is_refused() -> None:
    """The peer accepted our message, so it must be receiving: its own request is out of turn (104)."""
    p = ready(cfg(V100, max_block=8))
    p.client.send_message(bytes(400))
    p.server.receive_data(p.client.data_to_send())
    p.client.receive_data(p.server.data_to_send())  # accepted: the client streams
    assert p.client.outbound.name == "STREAMING"
    forged = wire.frame(MessageId.MESSAGE_TRANSMISSION_RQ, wire.TransmissionRq(Encryption.DES_CBC, 1, Mac.DES_MAC, 5).encode())
    with pytest.raises(RemoteProtocolError) as info:
        p.client.receive_data(forged)
    assert info.value.code is ErrorCode.BAD_MESSAGE_ID
    assert p.client.state is State.ERROR


def test_close_waits_for_the_peers_message_to_end() -> None:
    """close() while the peer's message is coming in: the request goes out after its MAC, and is accepted."""
    p = ready(cfg(V100, max_block=8))
    p.server.send_message(bytes(300))
    p.client.receive_data(p.server.data_to_send())  # the request, accepted
    p.client.close()
    assert p.sent_by(Role.CLIENT, MessageId.LINE_DISCONNECTION_RQ) == []
    got = p.pump()
    assert received(got.client) == [bytes(300)]
    assert got.client[-1].by_peer is False and got.server[-1].by_peer is True  # type: ignore[attr-defined]


# --- MD5: both PS3.15 orders, and the SDK's plain MD5 -------------------------------------------------


@pytest.mark.parametrize(("encryption", "key_id"), itertools.product(Encryption, [1, wire.SESSION_KEYS]), ids=str)
@pytest.mark.parametrize("sender_order", list(Md5Order), ids=lambda o: o.value)
@pytest.mark.parametrize("receiver_order", list(Md5Order), ids=lambda o: o.value)
def test_a_receiver_checks_either_md5_order(
    encryption: Encryption, key_id: int, sender_order: Md5Order, receiver_order: Md5Order
) -> None:
    def config(order: Md5Order) -> Config:
        return cfg(V100, encryption=encryption, mac=Mac.MD5, enc_key_id=key_id, md5_order=order)

    p = ready(config(receiver_order), config(sender_order))
    p.client.send_message(b"first")
    p.client.send_message(b"second, longer than a DES block")
    assert received(p.pump().server) == [b"first", b"second, longer than a DES block"]


@pytest.mark.parametrize("order", list(Md5Order), ids=lambda o: o.value)
def test_a_tampered_message_fails_either_md5_order(order: Md5Order) -> None:
    config = cfg(V100, encryption=Encryption.NONE, mac=Mac.MD5, md5_order=order)
    p = ConnectionPair(config, config)
    p.handshake()
    p.intercept = lambda role, f: [f.flip_bit(0)] if f.is_(MessageId.MESSAGE_TRANSMISSION_NOTIF) else [f.raw]
    p.client.send_message(b"a message to change")
    p.pump(raise_errors=False)
    assert p.errors[Role.SERVER].code is ErrorCode.BAD_MAC
    assert received(p.events[Role.SERVER]) == []


def test_plain_md5_without_encryption_needs_to_be_allowed() -> None:
    with pytest.raises(ValueError, match="no protection against tampering"):
        Config(profile=V100, encryption=Encryption.NONE, mac=Mac.MD5)
    Config(profile=V100, encryption=Encryption.NONE, mac=Mac.MD5, allow_unkeyed_md5=True)
    Config(profile=V100, encryption=Encryption.NONE, mac=Mac.MD5, md5_order=Md5Order.ENCRYPT_RANDOM)  # keyed
    Config(profile=Profile.HARDENED, encryption=Encryption.NONE, mac=Mac.MD5)  # hardened always encrypts its MAC


def test_a_receiver_that_does_not_allow_plain_md5_refuses_it() -> None:
    """The keyed order is accepted, the SDK's plain MD5 is not, unless this end allows it."""
    keyed = Config(profile=V100, encryption=Encryption.NONE, mac=Mac.MD5, md5_order=Md5Order.ENCRYPT_RANDOM)
    plain = Config(profile=V100, encryption=Encryption.NONE, mac=Mac.MD5, allow_unkeyed_md5=True)
    p = ready(keyed, plain)
    p.server.send_message(b"keyed, accepted")
    assert received(p.pump().client) == [b"keyed, accepted"]
    p.client.send_message(b"plain, refused")
    p.pump(raise_errors=False)
    assert p.errors[Role.SERVER].code is ErrorCode.BAD_MAC
    assert received(p.events[Role.SERVER]) == []


# --- padding ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mac", [Mac.MD5, Mac.DES_MAC])
def test_padding_is_checked_only_after_the_mac(mac: Mac) -> None:
    """A bit flipped into the padding is a MAC failure (113), never a padding error: no oracle."""
    config = cfg(V100, encryption=Encryption.DES_CBC, mac=mac)
    p = ready(config)
    p.client.send_message(b"x" * 16)  # whole blocks: the last 8 bytes on the wire are padding
    # The last byte of the ciphertext block before the padding block lands in the padding's last byte.
    p.intercept = lambda role, f: [f.flip_bit(-9)] if f.is_(MessageId.MESSAGE_TRANSMISSION_NOTIF) else [f.raw]
    p.pump(raise_errors=False)
    assert p.errors[Role.SERVER].code is ErrorCode.BAD_MAC


# --- NAKs the SDK's way ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sender", list(Role), ids=lambda r: r.value)
def test_a_length_refusal_is_110_at_the_sender_and_111_at_the_receiver(sender: Role) -> None:
    configs = {sender: cfg(V100), other(sender): cfg(V100, max_message=100)}
    p = ready(configs[Role.SERVER], configs[Role.CLIENT])
    p.conn(sender).send_message(bytes(101))
    got = p.pump()
    assert got.of(sender) == [MessageRefused(ErrorCode.PEER_LENGTH_TOO_SMALL, 101, 100)]
    receiver = p.conn(other(sender))
    assert receiver._transfer is not None and receiver._transfer.peer_request_code is ErrorCode.LOCAL_LENGTH_TOO_SMALL
    (rp,) = p.sent_by(other(sender), MessageId.MESSAGE_TRANSMISSION_RP)
    assert (rp.option, rp.err_no, rp.payload) == (wire.NAK, 0, struct.pack(">II", wire.NAK, 100))


def test_a_suite_refusal_is_109() -> None:
    p = ready(cfg(V100, mac=Mac.MD5), cfg(V100, mac=Mac.DES_MAC))
    p.client.send_message(b"refused")
    assert p.pump().client == [MessageRefused(ErrorCode.TRANSMISSION_MISMATCH, 7, wire.DEFAULT_MAX_MESSAGE)]


def test_errno_and_timestamp_are_ignored_on_receipt() -> None:
    """The SDK leaves TimeStamp and ErrNo unused: only the status field says why."""
    p = ready()

    def noisy(role: Role, f: Frame) -> list[bytes]:
        fields = list(struct.unpack_from(">8I", f.raw))
        fields[4], fields[5] = 0x12345678, 999  # TimeStamp, ErrNo
        return [struct.pack(">8I", *fields) + f.payload]

    p.intercept = noisy
    p.client.send_message(b"still fine")
    assert received(p.pump().server) == [b"still fine"]
    p.server.close()
    refusal = wire.frame(MessageId.LINE_DISCONNECTION_RP, wire.encode_status(115), option=wire.NAK, err_no=3)
    p.intercept = lambda role, f: [refusal] if f.is_(MessageId.LINE_DISCONNECTION_RP) else [f.raw]
    assert p.pump().server == [CloseRefused(115)]


# --- authentication -----------------------------------------------------------------------------------


def _auth_failure_nak(p: ConnectionPair, role: Role) -> tuple[int, int, int, int]:
    frames = [f for f in p.sent_by(role) if f.option == wire.NAK]
    assert len(frames) == 1, frames
    f = frames[0]
    return f.message_id, f.option, f.err_no, struct.unpack_from(">I", f.payload)[0]


def test_every_authentication_failure_looks_the_same_to_the_peer() -> None:
    """A wrong response and a reflected challenge get the same NAK: the peer cannot tell which check failed."""
    wrong_key = ConnectionPair(cfg(V100), cfg(V100), client_holder=make_holder(auth={**AUTH_KEYS, 1: OTHER_KEY}))
    wrong_key.server.initiate()
    wrong_key.pump(raise_errors=False)

    reflected = ConnectionPair(cfg(V100), cfg(V100))
    reflected.intercept = reflecting_the_servers_challenge(reflected)
    reflected.server.initiate()
    reflected.pump(raise_errors=False)
    assert reflected.errors[Role.SERVER].code is ErrorCode.REFLECTED_CHALLENGE  # the log keeps the reason
    expected = (MessageId.MUTUAL_AUTH_PASS3_NOTIF, wire.NAK, 0, ErrorCode.AUTHENTICATION_FAILED)
    assert _auth_failure_nak(wrong_key, Role.SERVER) == _auth_failure_nak(reflected, Role.SERVER) == expected
    for p in (wrong_key, reflected):
        assert p.errors[Role.CLIENT].code is ErrorCode.AUTHENTICATION_FAILED


def test_a_server_with_the_wrong_key_is_told_so_in_completion() -> None:
    p = ConnectionPair(cfg(V100), cfg(V100), server_holder=make_holder(auth={**AUTH_KEYS, 1: OTHER_KEY}))
    p.server.initiate()
    p.pump(raise_errors=False)
    # The server rejects the client's response first (its key differs too), so PASS3 is the NAK.
    assert _auth_failure_nak(p, Role.SERVER)[0] == MessageId.MUTUAL_AUTH_PASS3_NOTIF
    assert p.errors[Role.CLIENT].code is ErrorCode.AUTHENTICATION_FAILED


@pytest.mark.parametrize("client_profile", list(Profile), ids=lambda p: p.value)
def test_a_profile_mismatch_fails_the_handshake_naming_the_profile(client_profile: Profile) -> None:
    server_profile = Profile.HARDENED if client_profile is V100 else V100
    p = ConnectionPair(cfg(server_profile), cfg(client_profile))
    p.server.initiate()
    p.pump(raise_errors=False)
    assert p.errors, "the link came up across profiles"
    for role, error in p.errors.items():
        assert "profile" in str(error), (role, str(error))
    for role in Role:
        if role not in p.errors:
            p.eof(role)
            assert "profile" in str(p.errors[role])
    assert not any(isinstance(e, MessageReceived) for role in Role for e in p.events[role])


def test_frames_sent_together_split_anywhere_still_take_turns() -> None:
    """Crossing requests with every frame cut into single bytes."""
    p = ready(cfg(V100, max_block=16))
    p.server.send_message(bytes(50))
    p.client.send_message(bytes(70))
    got = p.pump(chunk=1)
    assert received(got.client) == [bytes(50)] and received(got.server) == [bytes(70)]


class _CardLike(MemoryKeyHolder):
    """A key holder that, like an IC card, never gives an encryption key out."""

    gives_encryption_keys = False

    def encryption_key(self, enc_key_id: int) -> RecordKey:
        raise AssertionError("a card-like holder was asked for encryption key N")


@pytest.mark.parametrize(("settings", "servable"), [
    ({}, False),
    ({"enc_key_id": wire.SESSION_KEYS}, True),
    ({"encryption": Encryption.NONE, "mac": Mac.NONE}, True),
    ({"profile": Profile.HARDENED}, True),
], ids=["key1", "session", "no-keys", "hardened"])
def test_a_key_holder_that_never_gives_a_key_out_is_refused_before_any_link(settings: dict, servable: bool) -> None:
    holder = _CardLike(AUTH_KEYS, ENC_KEYS, name="card")
    config = Config(**{"profile": V100, **settings})
    if servable:
        check_key_holder(config, holder)
        p = ConnectionPair(config, config, server_holder=holder, client_holder=holder)
        p.handshake()
        p.client.send_message(b"over a card")
        assert received(p.pump().server) == [b"over a card"]
        return
    with pytest.raises(KeyHolderError) as caught:
        check_key_holder(config, holder)
    assert caught.value.code is ErrorCode.BAD_OPTION
    assert "--enc-key-id session" in str(caught.value) and "never gives a key out" in str(caught.value)
    with pytest.raises(KeyHolderError):
        Connection(Role.SERVER, holder, config)
