"""The engine on well-behaved links: every suite, size, block length, close and through-mode path."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from typing import TypeVar

import pytest

from iscl_hsm import wire
from iscl_hsm.engine import (
    ChallengeGuard,
    Closed,
    CloseRefused,
    Config,
    Connection,
    Event,
    LinkReady,
    MessageReceived,
    MessageRefused,
    MessageSent,
    NonSecureReceived,
    Profile,
    Role,
    State,
)
from iscl_hsm.engine.transfer import SEAL_AHEAD_LIMIT, SEAL_AHEAD_STEP
from iscl_hsm.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from iscl_hsm.keyholder.base import Buffer, RecordKey
from iscl_hsm.keyholder.memory import MemoryKeyHolder
from iscl_hsm.wire import Encryption, Mac, MessageId
from tests.helpers import (
    AUTH_KEYS,
    ENC_KEYS,
    HARDENED_ONLY,
    OTHER_KEY,
    V100_ONLY,
    ConnectionPair,
    assert_no_secrets,
    cfg,
    data_on_the_wire,
    everything_to_send,
    exchange,
    frames_of,
    make_holder,
    nak_err_no,
    other,
    split_frames,
)

ENCRYPTIONS = [Encryption.NONE, Encryption.DES_CBC]
MACS = [Mac.NONE, Mac.MD5, Mac.DES_MAC]
KEY_IDS = [*range(1, 9), wire.SESSION_KEYS]
ROLES = [Role.CLIENT, Role.SERVER]
T = TypeVar("T")


def payload(n: int, seed: int = 0) -> bytes:
    """Recognisable, non-repeating message data of ``n`` bytes."""
    return bytes((i * 7 + seed * 13 + (i >> 8)) & 0xFF for i in range(n))


def received(events: list[object]) -> list[bytes]:
    return [e.data for e in events if isinstance(e, MessageReceived)]


def sent_lengths(events: list[object]) -> list[int]:
    return [e.length for e in events if isinstance(e, MessageSent)]


def transfer(p: ConnectionPair, sender: Role, *messages: bytes) -> list[bytes]:
    """Send messages from ``sender``, pump, check the sender's MessageSent events; return what arrived."""
    for m in messages:
        p.conn(sender).send_message(m)
    got = p.pump()
    assert sent_lengths(got.of(sender)) == [len(m) for m in messages]
    assert received(got.of(sender)) == []
    return received(got.of(other(sender)))


def mac_on_the_wire(profile: Profile, encryption: Encryption, mac: Mac) -> int:
    """Bytes of a MAC_TRANSMISSION_NOTIF's payload."""
    if profile is Profile.V100 and encryption is Encryption.DES_CBC and mac is not Mac.NONE:
        return wire.MAC_SIZE[mac] + 8  # the MAC is padded, then encrypted with the data's cipher
    return wire.MAC_SIZE[mac]


# --- every suite, both directions ----------------------------------------------------------------


@pytest.mark.parametrize("sender", ROLES, ids=lambda r: r.value)
@pytest.mark.parametrize("key_id", KEY_IDS, ids=lambda k: f"key{k:#x}")
@pytest.mark.parametrize("mac", MACS, ids=lambda m: m.name)
@pytest.mark.parametrize("encryption", ENCRYPTIONS, ids=lambda e: e.name)
def test_every_suite_both_directions(profile: Profile, make_ready, encryption: Encryption, mac: Mac, key_id: int, sender: Role) -> None:
    config = cfg(profile, encryption=encryption, mac=mac, enc_key_id=key_id, max_block=64)
    p = make_ready(config)
    for role in ROLES:
        params = p.conn(role).parameters
        assert params is not None
        assert (params.encryption, params.mac, params.enc_key_id, params.block_length) == (encryption, mac, key_id, 64)
    messages = [payload(200, 1), payload(77, 2), payload(64, 3)]
    assert transfer(p, sender, *messages) == messages
    # The other direction works on the same link afterwards (on its own chain, or on the one shared chain).
    assert transfer(p, other(sender), payload(130, 4)) == [payload(130, 4)]

    blocks = p.sent_by(sender, MessageId.MESSAGE_TRANSMISSION_NOTIF)
    wire_data = b"".join(f.payload for f in blocks)
    if encryption is Encryption.DES_CBC:
        assert payload(200, 1)[:64] not in wire_data  # the data does not travel in the clear
        assert all(len(f.payload) % 8 == 0 for f in blocks)
    else:
        assert wire_data == b"".join(messages)
    macs = p.sent_by(sender, MessageId.MAC_TRANSMISSION_NOTIF)
    assert [len(f.payload) for f in macs] == [mac_on_the_wire(profile, encryption, mac)] * 3
    session_rqs = p.sent_by(sender, MessageId.RNDNO_FOR_SESSION_KEY_RQ)
    assert len(session_rqs) == (3 if key_id == wire.SESSION_KEYS else 0)
    assert len({f.payload for f in session_rqs}) == len(session_rqs)  # a fresh random number per message


@pytest.mark.parametrize("key_id", [1, wire.SESSION_KEYS], ids=["key1", "session"])
@pytest.mark.parametrize(("encryption", "mac"), list(itertools.product(ENCRYPTIONS, MACS)), ids=str)
def test_same_message_twice_looks_different_on_the_wire_unless_v100_sends_it_unencrypted(
    profile: Profile, make_ready, encryption: Encryption, mac: Mac, key_id: int
) -> None:
    """The CBC chain (and in hardened the MAC's sequence number) carry over, so a repeat is not visible.

    V1.00 with encryption none sends the MAC in the clear over the message alone: under a fixed key
    (or unkeyed MD5) a repeated message repeats its MAC, which is what lets a whole message be replayed
    (docs/security.md).
    """
    p = make_ready(cfg(profile, encryption=encryption, mac=mac, enc_key_id=key_id))
    m = payload(40)
    assert transfer(p, Role.CLIENT, m, m) == [m, m]
    macs = [f.payload for f in p.sent_by(Role.CLIENT, MessageId.MAC_TRANSMISSION_NOTIF)]
    blocks = [f.payload for f in p.sent_by(Role.CLIENT, MessageId.MESSAGE_TRANSMISSION_NOTIF)]
    repeats = profile is Profile.V100 and encryption is Encryption.NONE and (mac is Mac.MD5 or key_id != wire.SESSION_KEYS)
    if mac is not Mac.NONE:
        assert (macs[0] == macs[1]) is repeats
    if encryption is Encryption.DES_CBC:
        assert blocks[0] != blocks[1]


@pytest.mark.parametrize(("key_id", "works"), [(4, True), (5, False)])
def test_key_id_selects_that_encryption_key(profile: Profile, key_id: int, works: bool) -> None:
    """The two holders differ only in encryption key 5: key id 4 works, key id 5 fails its MAC."""
    config = cfg(profile, enc_key_id=key_id)
    p = ConnectionPair(config, config, client_holder=make_holder(enc={**ENC_KEYS, 5: OTHER_KEY}))
    p.handshake()
    p.client.send_message(payload(24))
    p.pump(raise_errors=False)
    if works:
        assert received(p.events[Role.SERVER]) == [payload(24)]
        assert p.errors == {}
    else:
        assert received(p.events[Role.SERVER]) == []
        assert p.errors[Role.SERVER].code is ErrorCode.BAD_MAC


# --- sizes ---------------------------------------------------------------------------------------

BLOCK = 64
MAX_MESSAGE = 1000
SIZES = {"empty": 0, "one": 1, "block": BLOCK, "block+1": BLOCK + 1, "many": 7 * BLOCK + 3, "max": MAX_MESSAGE}


@pytest.mark.parametrize("sender", ROLES, ids=lambda r: r.value)
@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("key_id", [1, wire.SESSION_KEYS], ids=["key1", "session"])
@pytest.mark.parametrize(("encryption", "mac"), list(itertools.product(ENCRYPTIONS, MACS)), ids=str)
def test_message_sizes(profile: Profile, make_ready, encryption: Encryption, mac: Mac, key_id: int, size: int, sender: Role) -> None:
    config = cfg(profile, encryption=encryption, mac=mac, enc_key_id=key_id, max_block=BLOCK, max_message=MAX_MESSAGE)
    p = make_ready(config)
    m = payload(size, size)
    assert transfer(p, sender, m) == [m]
    blocks = p.sent_by(sender, MessageId.MESSAGE_TRANSMISSION_NOTIF)
    on_wire = data_on_the_wire(profile, encryption, size)
    assert [len(f.payload) for f in blocks] == [min(BLOCK, on_wire - i) for i in range(0, on_wire, BLOCK)]
    assert p.conn(sender).idle and p.conn(other(sender)).idle


def test_default_max_message_exactly(profile: Profile, make_ready) -> None:
    p = make_ready(cfg(profile))
    m = payload(wire.DEFAULT_MAX_MESSAGE)
    assert transfer(p, Role.CLIENT, m) == [m]
    with pytest.raises(LocalProtocolError) as info:
        p.client.send_message(m + b"x")
    assert info.value.code is ErrorCode.LOCAL_LENGTH_TOO_SMALL
    assert_no_secrets(info.value, m[:64])


def test_byte_at_a_time_delivery(profile: Profile) -> None:
    """Frames split anywhere (down to single bytes) are reassembled."""
    p = ConnectionPair(cfg(profile, max_block=16), cfg(profile, max_block=16))
    p.server.initiate()
    got = p.pump(chunk=1)
    assert [type(e) for e in got.server] == [LinkReady]
    assert [type(e) for e in got.client] == [LinkReady]
    p.client.send_message(payload(50))
    p.server.send_message(payload(3))
    got = p.pump(chunk=3)
    assert received(got.server) == [payload(50)]
    assert received(got.client) == [payload(3)]


def test_whole_stream_in_one_call(profile: Profile) -> None:
    """Several frames in one receive_data call: every event comes back, in order."""
    p = ConnectionPair(profile=profile)
    p.handshake()
    p.client.send_message(b"first")
    p.server.receive_data(p.client.data_to_send())
    p.client.receive_data(p.server.data_to_send())
    p.client.send_message(b"second")
    stream = everything_to_send(p.client)  # blocks + MAC of "first", then the request of "second"
    events = p.server.receive_data(stream)
    assert received(events) == [b"first"]
    p.client.receive_data(p.server.data_to_send())
    assert received(p.server.receive_data(everything_to_send(p.client))) == [b"second"]


# --- block lengths -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server_max", "client_max", "agreed"),
    [(8, 8, 8), (16, 16, 16), (8160, 8160, 8160), (8, 8160, 8), (8160, 8, 8), (64, 16, 16), (16, 64, 16),
     (4096, 8160, 4096), (8160, 4096, 4096)],
)
def test_block_length_is_the_minimum(profile: Profile, server_max: int, client_max: int, agreed: int) -> None:
    p = ConnectionPair(cfg(profile, max_block=server_max), cfg(profile, max_block=client_max, encryption=Encryption.DES_CBC))
    assert p.server.block_length == p.client.block_length == 0
    p.handshake()
    assert p.server.block_length == p.client.block_length == agreed
    assert p.server.parameters.block_length == p.client.parameters.block_length == agreed  # type: ignore[union-attr]
    rp = p.sent_by(Role.CLIENT, MessageId.LINE_CONNECTION_CHECK_RP)[0]
    assert wire.LineConnectionRp.decode(rp.payload) == wire.LineConnectionRp(0, agreed)
    rq = p.sent_by(Role.SERVER, MessageId.LINE_CONNECTION_CHECK_RQ)[0]
    assert wire.LineConnectionRq.decode(rq.payload) == wire.LineConnectionRq(server_max, wire.VERSION)
    for sender in ROLES:
        m = payload(2 * agreed + 1, agreed)
        assert transfer(p, sender, m) == [m]
        sizes = [len(f.payload) for f in p.sent_by(sender, MessageId.MESSAGE_TRANSMISSION_NOTIF)]
        assert sizes == [agreed, agreed, 8]


# --- authentication data -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 128])
def test_auth_data_reaches_the_peer(profile: Profile, size: int) -> None:
    server_data, client_data = b"S" * (size - 1) + b"s", b"C" * (size - 1) + b"c"
    p = ConnectionPair(cfg(profile, auth_data=server_data), cfg(profile, auth_data=client_data))
    got = p.handshake()
    (server_ready,) = got.server
    (client_ready,) = got.client
    assert server_ready.parameters.peer_auth_data == client_data
    assert client_ready.parameters.peer_auth_data == server_data
    assert p.server.parameters == server_ready.parameters
    if size > 1:
        assert client_data not in repr(server_ready).encode()  # repr=False on the field


def test_link_parameters_name_what_was_agreed(profile: Profile) -> None:
    p = ConnectionPair(cfg(profile, auth_key_id=3, enc_key_id=5), cfg(profile, auth_key_id=3, enc_key_id=5))
    got = p.handshake()
    for events in (got.server, got.client):
        params = events[0].parameters
        assert params.version == "MEDIS-ISCL V1.00"
        assert (params.auth_key_id, params.enc_key_id) == (3, 5)
        assert (params.encryption, params.mac) == (Encryption.DES_CBC, Mac.DES_MAC)


def test_server_uses_the_key_pair_the_client_chose(profile: Profile) -> None:
    p = ConnectionPair(cfg(profile, auth_key_id=1), cfg(profile, auth_key_id=6))
    p.handshake()
    assert p.server.parameters.auth_key_id == 6  # type: ignore[union-attr]
    rq = wire.MutualAuthRq.decode(p.sent_by(Role.CLIENT, MessageId.MUTUAL_AUTH_RQ)[0].payload, p.client.profile.layout)
    assert rq.key_id == 6


# --- line disconnection --------------------------------------------------------------------------


@pytest.mark.parametrize("closer", ROLES, ids=lambda r: r.value)
def test_line_disconnection(profile: Profile, ready_pair: ConnectionPair, closer: Role) -> None:
    p = ready_pair
    p.conn(closer).close()
    assert p.conn(closer).state is State.CLOSING
    with pytest.raises(LocalProtocolError) as info:
        p.conn(closer).send_message(b"too late")
    assert info.value.code is ErrorCode.BAD_STATE
    got = p.pump()
    assert got.of(closer) == [Closed(by_peer=False)]
    assert got.of(other(closer)) == [Closed(by_peer=True)]
    assert p.server.state is State.CLOSED and p.client.state is State.CLOSED
    for role in ROLES:
        assert p.conn(role).receive_data(b"") == []  # EOF after a clean close is no error
        with pytest.raises(LocalProtocolError) as info:
            p.conn(role).send_message(b"x")
        assert info.value.code is ErrorCode.BAD_STATE
    assert len(p.sent_by(closer, MessageId.LINE_DISCONNECTION_RQ)) == 1
    (rp,) = p.sent_by(other(closer), MessageId.LINE_DISCONNECTION_RP)
    layout = p.server.profile.layout
    assert rp.option == wire.ACK
    assert wire.DisconnectionRp.decode(rp.payload, layout).status == 0
    assert len(rp.payload) == 4 + layout.disconnection_mac_size  # hardened: the answering end's MAC


@pytest.mark.parametrize("closer", ROLES, ids=lambda r: r.value)
def test_refused_close_keeps_the_link(profile: Profile, closer: Role) -> None:
    refuser = cfg(profile, accept_close=False)
    configs = {closer: cfg(profile), other(closer): refuser}
    p = ConnectionPair(configs[Role.SERVER], configs[Role.CLIENT])
    p.handshake()
    p.conn(closer).close()
    got = p.pump()
    assert got.of(closer) == [CloseRefused(115)]
    assert got.of(other(closer)) == []
    (rp,) = p.sent_by(other(closer), MessageId.LINE_DISCONNECTION_RP)
    assert (rp.option, rp.err_no) == (wire.NAK, nak_err_no(profile, ErrorCode.PEER_REFUSED_CLOSE))
    assert p.server.state is State.READY and p.client.state is State.READY
    for sender in ROLES:
        assert transfer(p, sender, b"still here") == [b"still here"]
    p.conn(closer).close()  # may ask again
    assert p.pump().of(closer) == [CloseRefused(115)]


def test_simultaneous_close(profile: Profile, ready_pair: ConnectionPair) -> None:
    p = ready_pair
    p.server.close()
    p.client.close()
    got = p.pump()
    assert got.server == [Closed(by_peer=False)]
    assert got.client == [Closed(by_peer=False)]
    assert p.server.state is State.CLOSED and p.client.state is State.CLOSED


@pytest.mark.parametrize("refuser", ROLES, ids=lambda r: r.value)
def test_simultaneous_close_with_a_refusing_end(profile: Profile, refuser: Role) -> None:
    """accept_close=False refuses a close the peer starts; when both ask, both end up closed."""
    configs = {refuser: cfg(profile, accept_close=False), other(refuser): cfg(profile)}
    p = ConnectionPair(configs[Role.SERVER], configs[Role.CLIENT])
    p.handshake()
    p.server.close()
    p.client.close()
    got = p.pump()
    assert got.server == [Closed(by_peer=False)]
    assert got.client == [Closed(by_peer=False)]
    assert p.server.state is State.CLOSED and p.client.state is State.CLOSED


def test_close_waits_for_queued_messages(profile: Profile, ready_pair: ConnectionPair) -> None:
    p = ready_pair
    big = payload(3 * wire.MAX_BLOCK + 9)
    p.client.send_message(big)
    p.client.send_message(b"second")
    p.client.close()
    got = p.pump()
    assert received(got.server) == [big, b"second"]
    assert got.server[-1] == Closed(by_peer=True)
    assert got.client[-1] == Closed(by_peer=False)


def test_close_while_a_long_message_is_still_streaming(profile: Profile) -> None:
    """close() after the request was accepted but before every block is out still closes cleanly."""
    p = ConnectionPair(cfg(profile, max_block=8), cfg(profile, max_block=8))
    p.handshake()
    m = payload(40 * 8)  # 40 blocks: more than one data_to_send() batch
    p.client.send_message(m)
    p.server.receive_data(p.client.data_to_send())  # the request
    p.client.receive_data(p.server.data_to_send())  # the ACK: the sealer starts
    first = p.client.data_to_send()  # some of the blocks
    assert p.server.receive_data(first) == []
    p.client.close()
    got = p.pump()
    assert received(got.server) == [m]
    assert got.server[-1] == Closed(by_peer=True)
    assert got.client == [Closed(by_peer=False)]


@pytest.mark.parametrize("size", [0, 5])
def test_close_racing_a_message_is_refused(profile: Profile, size: int) -> None:
    """The peer asks to close while our request is in flight: we refuse, the message still arrives."""
    p = ConnectionPair(profile=profile)
    p.handshake()
    p.client.send_message(payload(size))  # the request goes out, unanswered yet
    p.server.close()
    got = p.pump()
    assert received(got.server) == [payload(size)]
    assert CloseRefused(115) in got.server
    assert p.server.state is State.READY and p.client.state is State.READY
    p.server.close()
    got = p.pump()
    assert got.server == [Closed(by_peer=False)] and got.client == [Closed(by_peer=True)]


# --- through mode --------------------------------------------------------------------------------


@pytest.mark.parametrize("sender", ROLES, ids=lambda r: r.value)
def test_through_mode(profile: Profile, sender: Role) -> None:
    on = cfg(profile, through_mode=True)
    p = ConnectionPair(on, on)
    p.handshake()
    p.conn(sender).send_non_secure(b"plain text, as agreed")
    p.conn(sender).send_non_secure(b"")
    got = p.pump()
    assert got.of(other(sender)) == [NonSecureReceived(b"plain text, as agreed"), NonSecureReceived(b"")]
    assert got.of(sender) == []
    frames = p.sent_by(sender, MessageId.THROUGH_MODE_TRANSMISSION_NOTIF)
    assert frames[0].payload == b"plain text, as agreed"  # unprotected by definition


def test_through_mode_alongside_secure_messages(profile: Profile) -> None:
    on = cfg(profile, through_mode=True, max_block=8)
    p = ConnectionPair(on, on)
    p.handshake()
    m = payload(200)
    p.client.send_message(m)
    p.client.send_non_secure(b"side note")
    got = p.pump()
    assert received(got.server) == [m]
    assert [e.data for e in got.server if isinstance(e, NonSecureReceived)] == [b"side note"]


def test_through_mode_off_on_the_receiver(profile: Profile) -> None:
    p = ConnectionPair(cfg(profile, through_mode=False), cfg(profile, through_mode=True))
    p.handshake()
    p.client.send_non_secure(b"PLAINTEXT-7f3a")
    p.pump(raise_errors=False)
    err = p.errors[Role.SERVER]
    assert isinstance(err, RemoteProtocolError)
    assert err.code is ErrorCode.THROUGH_MODE_DISABLED
    assert p.server.state is State.ERROR
    assert p.events[Role.SERVER][1:] == []
    assert_no_secrets(err, b"PLAINTEXT-7f3a")


def test_through_mode_off_locally(profile: Profile) -> None:
    p = ConnectionPair(cfg(profile, through_mode=True), cfg(profile, through_mode=False))
    p.handshake()
    with pytest.raises(LocalProtocolError) as info:
        p.client.send_non_secure(b"nope")
    assert info.value.code is ErrorCode.THROUGH_MODE_DISABLED
    assert p.client.data_to_send() == b""
    assert p.client.state is State.READY


def test_through_mode_respects_the_local_maximum(profile: Profile) -> None:
    on = cfg(profile, through_mode=True, max_message=10)
    p = ConnectionPair(on, on)
    p.handshake()
    with pytest.raises(LocalProtocolError) as info:
        p.client.send_non_secure(bytes(11))
    assert info.value.code is ErrorCode.LOCAL_LENGTH_TOO_SMALL
    p.client.send_non_secure(bytes(10))
    assert p.pump().server == [NonSecureReceived(bytes(10))]


# --- queueing and full duplex --------------------------------------------------------------------


@pytest.mark.parametrize("key_id", [1, wire.SESSION_KEYS], ids=["key1", "session"])
def test_queued_messages_arrive_in_order(profile: Profile, make_ready, key_id: int) -> None:
    p = make_ready(cfg(profile, enc_key_id=key_id, max_block=16))
    messages = [payload(33, 1), b"", payload(5, 3)]
    for m in messages:
        p.client.send_message(m)
    assert not p.client.idle
    # One request at a time: the second goes out only after the first message's MAC.
    first = p.client.data_to_send()
    assert [f.message_id for f in split_frames(first)] == [MessageId.MESSAGE_TRANSMISSION_RQ]
    p.server.receive_data(first)
    got = p.pump()
    assert received(got.server) == messages
    assert sent_lengths(got.client) == [33, 0, 5]
    assert p.client.idle and p.server.idle


@pytest.mark.parametrize("key_id", [1, wire.SESSION_KEYS], ids=["key1", "session"])
@HARDENED_ONLY
def test_full_duplex(profile: Profile, make_ready, key_id: int) -> None:
    p = make_ready(cfg(profile, enc_key_id=key_id, max_block=8))
    exchange(p, [payload(100, i) for i in range(3)], [payload(90, 10 + i) for i in range(3)])
    # The two directions really overlapped: data blocks of both were in flight in the same stretch.
    order = [r for r, f in p.sent if f.is_(MessageId.MESSAGE_TRANSMISSION_NOTIF)]
    first_server = order.index(Role.SERVER)
    assert Role.CLIENT in order[first_server:]
    assert Role.SERVER in order[: len(order) - 1 - order[::-1].index(Role.CLIENT)]


def test_message_refused_then_the_queue_continues(profile: Profile) -> None:
    p = ConnectionPair(cfg(profile, max_message=10), cfg(profile, max_message=100))
    p.handshake()
    p.client.send_message(bytes(50))
    p.client.send_message(b"short")
    got = p.pump()
    assert got.client == [MessageRefused(110, 50, 10), MessageSent(5)]
    assert received(got.server) == [b"short"]


# --- sealing ahead: the sender seals a requested message before the peer accepts it -------------


@pytest.mark.parametrize(("encryption", "mac", "key_id"), itertools.product(ENCRYPTIONS, MACS, [1, wire.SESSION_KEYS]))
def test_messages_sealed_ahead_arrive_whole_in_order_both_ways(profile: Profile, 
    encryption: Encryption, mac: Mac, key_id: int
) -> None:
    config = cfg(profile, encryption=encryption, mac=mac, enc_key_id=key_id)
    p = ConnectionPair(config, config, prepare=True)
    p.handshake()
    messages = [payload(n, seed) for seed, n in enumerate((0, 1, 3 * wire.MAX_BLOCK + 5, 8, wire.MAX_BLOCK))]
    for m in messages:
        p.client.send_message(m)
        p.server.send_message(m[::-1])
    got = p.pump()
    assert received(got.server) == messages
    assert received(got.client) == [m[::-1] for m in messages]


def test_a_refused_message_sealed_ahead_leaves_the_chain_where_it_was(profile: Profile) -> None:
    """The NAKed message moved only a copy of the CBC chain: the next one still deciphers and verifies."""
    p = ConnectionPair(cfg(profile, max_message=10), cfg(profile, max_message=100), prepare=True)
    p.handshake()
    p.client.send_message(b"accepted")
    p.pump()
    p.client.send_message(bytes(50))
    p.client.prepare()  # seals the 50 bytes ahead; the server will refuse them
    p.client.send_message(b"short")
    got = p.pump()
    assert got.client == [MessageRefused(110, 50, 10), MessageSent(5)]
    assert received(got.server) == [b"short"]


LONG = 256 * 1024  # far more than the engine seals before the peer accepts


@pytest.mark.parametrize(("encryption", "mac"), itertools.product(ENCRYPTIONS, MACS))
def test_a_message_longer_than_its_sealed_ahead_start_streams_out_and_verifies(profile: Profile, encryption: Encryption, mac: Mac) -> None:
    config = cfg(profile, encryption=encryption, mac=mac, max_message=1 << 20)
    p = ConnectionPair(config, config, prepare=True)
    p.handshake()
    messages = [payload(n, seed) for seed, n in enumerate((2 * LONG + 77, LONG, 5, LONG + 1))]
    for m in messages:
        p.client.send_message(m)
    assert received(p.pump().server) == messages


@pytest.mark.parametrize(("encryption", "mac"), itertools.product(ENCRYPTIONS, MACS))
def test_each_batch_goes_out_before_its_mac_work_and_the_mac_block_after_the_last(profile: Profile, 
    encryption: Encryption, mac: Mac
) -> None:
    """The receiver starts on a batch while the sender still works its MAC, so at a message's end it
    trails by less than a whole batch of its own work."""
    config = cfg(profile, encryption=encryption, mac=mac, max_message=1 << 20)
    p = ConnectionPair(config, config)
    p.handshake()
    message = payload(LONG + 1000, 5)
    p.client.send_message(message)
    p.server.receive_data(p.client.data_to_send())
    p.client.receive_data(p.server.data_to_send())  # the acceptance
    outputs = list(iter(p.client.data_to_send, b""))
    kinds = [{f.message_id for f in split_frames(out)} for out in outputs]
    assert len(outputs) > 2
    assert all(k == {MessageId.MESSAGE_TRANSMISSION_NOTIF} for k in kinds[:-1])
    assert kinds[-1] == {MessageId.MAC_TRANSMISSION_NOTIF}
    assert received(p.server.receive_data(b"".join(outputs))) == [message]


def request_awaiting_acceptance(p: ConnectionPair, *messages: bytes) -> None:
    """Queue ``messages`` at the client and let the server answer the first request, unread as yet."""
    for message in messages:
        p.client.send_message(message)
    p.server.receive_data(p.client.data_to_send())
    p.client.prepare()


def test_only_the_start_of_a_long_message_is_sealed_before_the_peer_accepts(profile: Profile) -> None:
    """The rest is sealed a batch at a time after the acceptance, so the receiver trails by little."""
    p = ConnectionPair(cfg(profile, max_message=1 << 20), cfg(profile, max_message=1 << 20), prepare=True)
    p.handshake()
    message = payload(3 * LONG, 1)
    request_awaiting_acceptance(p, message)  # prepare() seals ahead while the server decides
    p.client.receive_data(p.server.data_to_send())  # the acceptance
    first = p.client.data_to_send()
    assert 0 < len(first) < LONG
    sent = [first]
    while out := p.client.data_to_send():
        sent.append(out)
    assert len(sent) > 3
    events = p.server.receive_data(b"".join(sent))
    assert received(events) == [message]


def test_a_refused_long_message_sealed_ahead_leaves_the_chain_where_it_was(profile: Profile) -> None:
    p = ConnectionPair(cfg(profile, max_message=LONG), cfg(profile, max_message=1 << 20), prepare=True)
    p.handshake()
    p.client.send_message(payload(2 * LONG, 2))  # refused: longer than the server takes
    p.client.send_message(b"next")
    got = p.pump()
    assert got.client == [MessageRefused(110, 2 * LONG, LONG), MessageSent(4)]
    assert received(got.server) == [b"next"]


def seal_ahead_until_done(conn: Connection) -> int:
    """Call seal_ahead() as a transport does while the acceptance is still on its way; the calls that sealed."""
    calls = 0
    while conn.seal_ahead():
        calls += 1
    return calls


def data_sent_in(stream: bytes) -> int:
    return sum(len(f.payload) for f in frames_of(split_frames(stream), MessageId.MESSAGE_TRANSMISSION_NOTIF))


@pytest.mark.parametrize(("encryption", "mac"), itertools.product(ENCRYPTIONS, MACS))
def test_sealing_ahead_until_the_acceptance_stops_at_its_limit_and_the_message_verifies(profile: Profile, 
    encryption: Encryption, mac: Mac
) -> None:
    config = cfg(profile, encryption=encryption, mac=mac, max_message=1 << 20)
    p = ConnectionPair(config, config, prepare=True)
    p.handshake()
    message = payload(3 * LONG, 4)
    request_awaiting_acceptance(p, message)
    assert seal_ahead_until_done(p.client) > 0
    p.client.receive_data(p.server.data_to_send())  # the acceptance
    first = p.client.data_to_send()
    # What was sealed ahead goes out at once, nothing sealed after it: the receiver is waiting.
    assert SEAL_AHEAD_LIMIT <= data_sent_in(first) < SEAL_AHEAD_LIMIT + SEAL_AHEAD_STEP
    rest = everything_to_send(p.client)
    assert received(p.server.receive_data(first + rest)) == [message]


def test_a_short_message_sealed_whole_ahead_goes_out_whole_with_the_next_request(profile: Profile) -> None:
    p = ConnectionPair(profile=profile, prepare=True)
    p.handshake()
    request_awaiting_acceptance(p, b"short", b"next")
    assert p.client.seal_ahead()  # prepare() sealed its block, the next step its MAC
    assert not p.client.seal_ahead()  # and nothing is left
    p.client.receive_data(p.server.data_to_send())
    out = p.client.data_to_send()
    assert [f.message_id for f in split_frames(out)] == [
        MessageId.MESSAGE_TRANSMISSION_NOTIF,
        MessageId.MAC_TRANSMISSION_NOTIF,
        MessageId.MESSAGE_TRANSMISSION_RQ,
    ]
    assert received(p.server.receive_data(out)) == [b"short"]


def test_under_unique_session_keys_sealing_starts_once_the_random_number_is_out(profile: Profile) -> None:
    """A session key depends on the random number sent after the acceptance: nothing is sealed
    before it, and the keys derived to seal ahead are the message's (one derivation, not two)."""
    config = cfg(profile, enc_key_id=wire.SESSION_KEYS, max_message=1 << 20)
    holder = _CountingKeyHolder(AUTH_KEYS, ENC_KEYS, name="client")
    p = ConnectionPair(config, config, client_holder=holder, prepare=True)
    p.handshake()
    assert not p.client.seal_ahead()  # no request
    message = payload(2 * LONG, 6)
    request_awaiting_acceptance(p, message)
    assert not p.client.seal_ahead()  # requested, but no random number yet
    p.client.receive_data(p.server.data_to_send())  # the acceptance: the random number goes out
    p.server.receive_data(p.client.data_to_send())  # the server derives its keys and answers
    before = holder.calls
    p.client.prepare()  # the client derives its own meanwhile and seals the start of the message
    derivations = {Profile.V100: 1, Profile.HARDENED: 2}[profile]  # one key for both, or DES-CBC's and DES-MAC's
    assert holder.calls - before == derivations
    assert seal_ahead_until_done(p.client) > 0
    p.client.receive_data(p.server.data_to_send())  # the answer to the random number
    first = p.client.data_to_send()
    assert SEAL_AHEAD_LIMIT <= data_sent_in(first) < SEAL_AHEAD_LIMIT + SEAL_AHEAD_STEP
    rest = everything_to_send(p.client)
    assert holder.calls - before == derivations
    assert received(p.server.receive_data(first + rest)) == [message]


def test_a_message_refused_after_sealing_ahead_to_the_limit_leaves_the_chain_where_it_was(profile: Profile) -> None:
    p = ConnectionPair(cfg(profile, max_message=LONG), cfg(profile, max_message=1 << 20), prepare=True)
    p.handshake()
    request_awaiting_acceptance(p, payload(3 * LONG, 5), b"next")
    assert seal_ahead_until_done(p.client) > 0
    got = p.pump()
    assert got.client == [MessageRefused(110, 3 * LONG, LONG), MessageSent(4)]
    assert received(got.server) == [b"next"]


# --- states --------------------------------------------------------------------------------------


def step(p: ConnectionPair, sender: Role) -> None:
    data = p.conn(sender).data_to_send()
    assert data
    p.conn(other(sender)).receive_data(data)


def test_state_walk(profile: Profile) -> None:
    p = ConnectionPair(profile=profile)
    s, c = p.server, p.client
    assert (s.state, c.state) == (State.SERVER_START, State.CLIENT_WAIT_LINE_RQ)
    s.initiate()
    assert s.state is State.SERVER_WAIT_LINE_RP
    with pytest.raises(LocalProtocolError) as info:
        s.initiate()
    assert info.value.code is ErrorCode.BAD_STATE
    with pytest.raises(LocalProtocolError) as info:
        c.initiate()
    assert info.value.code is ErrorCode.BAD_STATE
    for conn in (s, c):
        with pytest.raises(LocalProtocolError) as info:
            conn.send_message(b"x")
        assert info.value.code is ErrorCode.BAD_STATE
        with pytest.raises(LocalProtocolError) as info:
            conn.close()
        assert info.value.code is ErrorCode.BAD_STATE
    step(p, Role.SERVER)  # line RQ
    assert c.state is State.CLIENT_WAIT_AUTH_RP
    step(p, Role.CLIENT)  # line RP + auth RQ
    assert s.state is State.SERVER_WAIT_PASS2
    step(p, Role.SERVER)  # auth RP + pass 1
    assert c.state is State.CLIENT_WAIT_PASS3
    step(p, Role.CLIENT)  # pass 2
    assert s.state is State.SERVER_WAIT_COMPLETION
    step(p, Role.SERVER)  # pass 3 -> the client is ready, completion out
    assert c.state is State.READY
    step(p, Role.CLIENT)
    assert s.state is State.READY
    assert s.idle and c.idle
    c.close()
    assert c.state is State.CLOSING
    step(p, Role.CLIENT)
    assert s.state is State.CLOSED
    step(p, Role.SERVER)
    assert c.state is State.CLOSED


def test_intermediate_states_by_one_frame(profile: Profile) -> None:
    """Each handshake frame delivered alone moves the receiver exactly one state."""
    p = ConnectionPair(profile=profile)
    seen = {Role.SERVER: [p.server.state], Role.CLIENT: [p.client.state]}
    p.server.initiate()
    seen[Role.SERVER].append(p.server.state)
    for _ in range(20):
        moved = False
        for sender in ROLES:
            data = p.conn(sender).data_to_send()
            for f in split_frames(data):
                moved = True
                p.conn(other(sender)).receive_data(f.raw)
                seen[other(sender)].append(p.conn(other(sender)).state)
        if not moved:
            break
    assert seen[Role.CLIENT] == [
        State.CLIENT_WAIT_LINE_RQ, State.CLIENT_WAIT_AUTH_RP, State.CLIENT_WAIT_PASS1, State.CLIENT_WAIT_PASS3,
        State.READY,
    ]
    assert seen[Role.SERVER] == [
        State.SERVER_START, State.SERVER_WAIT_LINE_RP, State.SERVER_WAIT_AUTH_RQ, State.SERVER_WAIT_PASS2,
        State.SERVER_WAIT_COMPLETION, State.READY,
    ]


def test_events_never_show_message_data(profile: Profile, ready_pair: ConnectionPair) -> None:
    secret = b"PATIENT NAME^SECRET"
    ready_pair.client.send_message(secret)
    got = ready_pair.pump()
    assert received(got.server) == [secret]
    for event in got.server + got.client:
        assert_no_secrets(event, secret)
    assert_no_secrets(ready_pair.server.parameters)


# --- may_block: which calls a transport must make off its event loop ---------------------------


class _CountingKeyHolder(MemoryKeyHolder):
    """The memory key holder, counting the calls a card or token would see."""

    calls = 0

    def get_challenge(self, key_id: int) -> bytes:
        self.calls += 1
        return super().get_challenge(key_id)

    def internal_authenticate(self, key_id: int, block: bytes) -> bytes:
        self.calls += 1
        return super().internal_authenticate(key_id, block)

    def external_authenticate(self, key_id: int, challenge: bytes, cryptogram: bytes) -> bool:
        self.calls += 1
        return super().external_authenticate(key_id, challenge, cryptogram)

    def derive_key(self, enc_key_id: int, block: bytes) -> RecordKey:
        self.calls += 1
        return super().derive_key(enc_key_id, block)

    def encryption_key(self, enc_key_id: int) -> RecordKey:
        self.calls += 1
        return super().encryption_key(enc_key_id)


class _CheckedConnection(Connection):
    """A connection that records every call made while it said it would not block."""

    def __init__(self, role: Role, holder: _CountingKeyHolder, config: Config) -> None:
        super().__init__(role, holder, config, guard=ChallengeGuard())
        self.holder = holder
        self.broken_promises: list[str] = []

    def _checked(self, name: str, call: Callable[[], T]) -> T:
        promised, before = not self.may_block, self.holder.calls
        result = call()
        if promised and self.holder.calls != before:
            self.broken_promises.append(f"{name} in {self.state.name}")
        return result

    def initiate(self) -> None:
        self._checked("initiate", super().initiate)

    def receive_data(self, data: bytes) -> list[Event]:
        return self._checked("receive_data", lambda: super(_CheckedConnection, self).receive_data(data))

    def data_to_send(self) -> bytes:
        """Like a transport: take the output, then run the deferred work while the peer is busy."""
        out = self._checked("data_to_send", super().data_to_send)
        self.prepare()
        return out

    def send_message(self, data: bytes) -> None:
        self._checked("send_message", lambda: super(_CheckedConnection, self).send_message(data))

    def prepare(self) -> None:
        self._checked("prepare", super().prepare)


class _TokenKeyHolder(_CountingKeyHolder):
    """Posing as a key holder whose record keys live in a token: each use of one is a call."""

    host_record_keys = False

    def derive_key(self, enc_key_id: int, block: bytes) -> RecordKey:
        return _TokenRecordKey(self, super().derive_key(enc_key_id, block))

    def encryption_key(self, enc_key_id: int) -> RecordKey:
        return _TokenRecordKey(self, super().encryption_key(enc_key_id))


class _TokenRecordKey:
    in_process = False

    def __init__(self, holder: _CountingKeyHolder, key: RecordKey) -> None:
        self._holder, self._key = holder, key

    def encrypt_cbc(self, iv: bytes, data: Buffer) -> bytes:
        self._holder.calls += 1
        return self._key.encrypt_cbc(iv, data)

    def decrypt_cbc(self, iv: bytes, data: Buffer) -> bytes:
        self._holder.calls += 1
        return self._key.decrypt_cbc(iv, data)


@pytest.mark.parametrize("holder", [_CountingKeyHolder, _TokenKeyHolder])
@pytest.mark.parametrize(("encryption", "mac", "key_id"), itertools.product(ENCRYPTIONS, MACS, [1, wire.SESSION_KEYS]))
def test_a_connection_that_says_it_will_not_block_makes_no_key_holder_call(profile: Profile, 
    holder: type[_CountingKeyHolder], encryption: Encryption, mac: Mac, key_id: int
) -> None:
    config = cfg(profile, encryption=encryption, mac=mac, enc_key_id=key_id)
    server = _CheckedConnection(Role.SERVER, holder(AUTH_KEYS, ENC_KEYS, name="server"), config)
    client = _CheckedConnection(Role.CLIENT, holder(AUTH_KEYS, ENC_KEYS, name="client"), config)
    pair = ConnectionPair(profile=profile, server=server, client=client)
    server.initiate()
    for _ in range(3):  # handshake, then messages both ways
        pair.pump()
        client.send_message(payload(2 * wire.MAX_BLOCK + 5))
        server.send_message(payload(17))
    pair.pump()
    assert [type(e) for e in pair.events[Role.SERVER]].count(MessageReceived) == 3
    assert server.broken_promises == [] and client.broken_promises == []
    assert server.holder.calls and client.holder.calls


@pytest.mark.parametrize("key_id", [1, wire.SESSION_KEYS], ids=["key1", "session"])
def test_the_handshake_keeps_the_promise_when_messages_arrive_together(profile: Profile, key_id: int) -> None:
    """A transport feeds whatever one read returned: the client's LINE_RP with its AUTH_RQ, the
    server's AUTH_RP with PASS1. The call that takes both must count as one that may block."""
    config = cfg(profile, enc_key_id=key_id)
    server = _CheckedConnection(Role.SERVER, _CountingKeyHolder(AUTH_KEYS, ENC_KEYS, name="server"), config)
    client = _CheckedConnection(Role.CLIENT, _CountingKeyHolder(AUTH_KEYS, ENC_KEYS, name="client"), config)
    _handshake_in_whole_writes(server, client)
    assert client.state is State.READY and server.state is State.READY
    assert server.broken_promises == [] and client.broken_promises == []


def _handshake_in_whole_writes(
    server: _CheckedConnection, client: _CheckedConnection, before_server_reads: Callable[[], None] = lambda: None
) -> None:
    """Run the handshake as a transport would: each end's whole output (prepare() run after taking
    it) delivered in one call, so messages sent together arrive together."""
    server.initiate()
    for _ in range(50):
        moved = False
        for sender, receiver in ((server, client), (client, server)):
            if out := sender.data_to_send():  # (runs prepare(), as a transport does)
                if receiver is server:
                    before_server_reads()
                receiver.receive_data(out)
                moved = True
        if not moved:
            break


@pytest.mark.parametrize(("holder", "token"), [(_CountingKeyHolder, False), (_TokenKeyHolder, True)], ids=["host", "token"])
@pytest.mark.parametrize("key_id", [1, 2, wire.SESSION_KEYS], ids=["key1", "key2", "session"])
def test_the_clients_completion_is_host_work_once_the_server_derived_its_keys(
    profile: Profile, holder: type[_CountingKeyHolder], token: bool, key_id: int
) -> None:
    """The server derives the handshake-MAC key and the record keys while the client checks pass 3,
    so checking the client's COMPLETION needs no key holder (one thread hand-off fewer per asyncio
    link); with hardened keys kept in a token it is still a token operation (the MAC's prefix).
    V1.00's COMPLETION carries no MAC, and a request behind it needs only the key fetched already."""
    blocks = token and profile is Profile.HARDENED
    config = cfg(profile, enc_key_id=key_id)
    server = _CheckedConnection(Role.SERVER, holder(AUTH_KEYS, ENC_KEYS, name="server"), config)
    client = _CheckedConnection(Role.CLIENT, holder(AUTH_KEYS, ENC_KEYS, name="client"), config)
    at_completion: list[bool] = []

    def note_completion_promise() -> None:
        if server.state is State.SERVER_WAIT_COMPLETION:
            at_completion.append(server.may_block)

    _handshake_in_whole_writes(server, client, note_completion_promise)
    assert at_completion == [blocks]
    assert client.state is State.READY and server.state is State.READY
    assert server.broken_promises == [] and client.broken_promises == []


def _ready_pair(config: Config, holder: type[MemoryKeyHolder] = MemoryKeyHolder) -> ConnectionPair:
    pair = ConnectionPair(
        config,
        config,
        server_holder=holder(AUTH_KEYS, ENC_KEYS, name="server"),
        client_holder=holder(AUTH_KEYS, ENC_KEYS, name="client"),
    )
    pair.handshake()
    return pair


def test_a_link_with_fixed_host_keys_stops_blocking_once_prepare_derived_them(profile: Profile) -> None:
    pair = _ready_pair(cfg(profile))
    for role in ROLES:
        conn = pair.conn(role)
        assert conn.may_block, "the link keys are not derived yet"
        conn.prepare()
        assert not conn.may_block
    pair.client.send_message(payload(3 * wire.MAX_BLOCK))
    pair.pump()
    assert not pair.client.may_block and not pair.server.may_block


@pytest.mark.parametrize(
    ("settings", "holder", "why"),
    [
        ({"enc_key_id": wire.SESSION_KEYS}, MemoryKeyHolder, "every message derives a fresh key"),
        ({}, _TokenKeyHolder, "every record is a token operation"),
    ],
)
def test_session_keys_and_token_record_keys_always_block(
    profile: Profile, settings: dict, holder: type[MemoryKeyHolder], why: str
) -> None:
    pair = _ready_pair(cfg(profile, **settings), holder)
    for role in ROLES:
        pair.conn(role).prepare()
        assert pair.conn(role).may_block, why


def test_a_link_without_keys_never_blocks_after_the_handshake(profile: Profile) -> None:
    pair = _ready_pair(cfg(profile, encryption=Encryption.NONE, mac=Mac.NONE))
    for role in ROLES:
        pair.conn(role).prepare()  # (the handshake's own deferred derivation may still be queued)
        assert not pair.conn(role).may_block


@HARDENED_ONLY
def test_a_missing_encryption_key_is_left_for_the_first_message_to_report(profile: Profile) -> None:
    enc = {i: k for i, k in ENC_KEYS.items() if i != 2}
    config = cfg(profile, enc_key_id=2)  # (encryption key 1 still serves the handshake MACs)
    pair = ConnectionPair(config, config, server_holder=make_holder(enc=enc, name="server"))
    pair.handshake()
    pair.server.prepare()  # does not raise: the message that needs the key tells the peer
    assert pair.server.may_block and pair.server.state is State.READY
    pair.client.send_message(b"x")
    got = pair.pump(raise_errors=False)
    assert pair.errors[Role.SERVER].code is ErrorCode.KEY_NOT_FOUND
    assert got.of(Role.CLIENT) == [MessageRefused(ErrorCode.REMOTE_KEY_HOLDER, 1, wire.DEFAULT_MAX_MESSAGE)]


@V100_ONLY
@pytest.mark.parametrize("side", ROLES, ids=lambda r: r.value)
def test_a_missing_encryption_key_fails_the_v100_handshake_with_the_peer_told(profile: Profile, side: Role) -> None:
    """V1.00 uses encryption key N itself, so the handshake makes sure it is there: the end without
    it fails with KEY_NOT_FOUND and tells the peer (PASS3 or COMPLETION as NAK 103)."""
    enc = {i: k for i, k in ENC_KEYS.items() if i != 2}
    config = cfg(profile, enc_key_id=2)
    holders = {side: make_holder(enc=enc, name="without"), other(side): make_holder(name="with")}
    pair = ConnectionPair(config, config, server_holder=holders[Role.SERVER], client_holder=holders[Role.CLIENT])
    pair.server.initiate()
    pair.pump(raise_errors=False)
    assert pair.errors[side].code is ErrorCode.KEY_NOT_FOUND
    assert pair.errors[other(side)].code is ErrorCode.REMOTE_KEY_HOLDER
    told = MessageId.MUTUAL_AUTH_PASS3_NOTIF if side is Role.SERVER else MessageId.MUTUAL_AUTH_COMPLETION_NOTIF
    (nak,) = pair.sent_by(side, told)
    assert (nak.option, nak.err_no, struct.unpack_from(">I", nak.payload)[0]) == (wire.NAK, 0, ErrorCode.REMOTE_KEY_HOLDER)
    assert not any(isinstance(e, LinkReady) for role in ROLES for e in pair.events[role])


class _Expecting(MemoryKeyHolder):
    """Notes the challenges whose responses the engine asks to have worked out ahead."""

    def __init__(self, name: str) -> None:
        super().__init__(AUTH_KEYS, ENC_KEYS, name=name)
        self.expected: list[bytes] = []

    def expect_response(self, key_id: int, challenge: bytes) -> None:
        self.expected.append(challenge)


def test_each_end_has_the_response_to_its_challenge_worked_out_while_the_peer_answers(profile: Profile) -> None:
    """prepare() after PASS1 (server) and PASS2 (client) asks the key holder for the response it will
    check, so that the step that checks it makes one token call fewer on the handshake's critical path."""
    server, client = _Expecting("server"), _Expecting("client")
    p = ConnectionPair(cfg(profile), cfg(profile), server_holder=server, client_holder=client, prepare=True)
    p.handshake()
    (pass1,) = p.sent_by(Role.SERVER, MessageId.MUTUAL_AUTH_PASS1_NOTIF)
    (pass2,) = p.sent_by(Role.CLIENT, MessageId.MUTUAL_AUTH_PASS2_NOTIF)
    assert server.expected == [wire.Pass1.decode(pass1.payload).challenge]
    assert client.expected == [wire.Pass2.decode(pass2.payload).challenge]
