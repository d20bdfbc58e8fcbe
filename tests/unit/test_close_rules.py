"""Line disconnection against messages in flight: a disconnection never completes while a message is
half sent or half received (both profiles), and in the hardened profile it is authenticated by the
count of messages each way, so an injected, replayed or early one is refused."""

from __future__ import annotations

import pytest

from iscl_hsm import wire
from iscl_hsm.engine import Closed, CloseRefused, Profile, Role, State
from iscl_hsm.errors import ErrorCode
from iscl_hsm.wire import MessageId
from tests.helpers import (
    HARDENED_ONLY,
    V100_ONLY,
    ConnectionPair,
    Frame,
    cfg,
    everything_to_send,
    nak_err_no,
    other,
    received,
)

ROLES = [Role.CLIENT, Role.SERVER]
MESSAGE = bytes(range(256)) * 8  # 2048 bytes: 32 blocks of 64, more than one batch
POINTS = ["queued", "requested", "accepted", "streaming", "delivered"]
"""Where the message is when close() is called (see :func:`advance`)."""


def ready(profile: Profile, **settings: object) -> ConnectionPair:
    p = ConnectionPair(cfg(profile, max_block=64, **settings), cfg(profile, max_block=64, **settings))
    p.handshake()
    return p


def advance(p: ConnectionPair, sender: Role, point: str) -> None:
    """Send MESSAGE from ``sender`` and stop where ``point`` says."""
    p.conn(sender).send_message(MESSAGE)
    steps = {"queued": 0, "requested": 1, "accepted": 2, "streaming": 3}
    for n in range(steps.get(point, 0)):
        p.step(sender if n % 2 == 0 else other(sender))  # RQ, then RP (and RNDNO), then a batch of blocks
    if point == "delivered":
        p.pump()


def closes_cleanly(p: ConnectionPair, closer: Role) -> None:
    """Pump to the end; a refused close (the peer was busy) is asked again. Both ends end CLOSED."""
    p.pump()
    if CloseRefused(115) in p.events[closer]:
        p.conn(closer).close()
        p.pump()
    assert Closed(by_peer=False) in p.events[closer]
    assert p.server.state is State.CLOSED and p.client.state is State.CLOSED
    assert p.errors == {}


@pytest.mark.parametrize("key_id", [1, wire.SESSION_KEYS], ids=["key1", "session"])
@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("closer_sends", [True, False], ids=["sender-closes", "receiver-closes"])
@pytest.mark.parametrize("sender", ROLES, ids=lambda r: f"{r.value}-sends")
def test_each_ordering_of_close_and_a_message_delivers_it_whole_then_closes(
    profile: Profile, sender: Role, closer_sends: bool, point: str, key_id: int
) -> None:
    p = ready(profile, enc_key_id=key_id)
    closer = sender if closer_sends else other(sender)
    advance(p, sender, point)
    p.conn(closer).close()
    closes_cleanly(p, closer)
    assert received(p.events[other(sender)]) == [MESSAGE]
    assert received(p.events[sender]) == []


@pytest.mark.parametrize("closer", ROLES, ids=lambda r: r.value)
def test_a_close_asked_for_while_a_message_comes_in_waits_for_its_mac(profile: Profile, closer: Role) -> None:
    p = ready(profile)
    advance(p, other(closer), "streaming")
    p.conn(closer).close()
    p.step(closer)
    assert p.sent_by(closer, MessageId.LINE_DISCONNECTION_RQ) == []
    p.pump()
    assert received(p.events[closer]) == [MESSAGE]
    assert p.sent_by(closer, MessageId.LINE_DISCONNECTION_RQ) != []
    assert p.events[closer][-1] == Closed(by_peer=False)


def close_crossing_a_request(profile: Profile, closer: Role) -> tuple[ConnectionPair, bytes]:
    """A ready pair whose ``closer`` asks to disconnect while the other end's message request is on its
    way; the request is returned undelivered."""
    p = ready(profile)
    p.conn(other(closer)).send_message(MESSAGE)
    request = everything_to_send(p.conn(other(closer)))
    p.conn(closer).close()
    return p, request


@pytest.mark.parametrize("closer", ROLES, ids=lambda r: r.value)
def test_a_close_crossing_a_message_request_is_refused_and_the_message_still_arrives(
    profile: Profile, closer: Role
) -> None:
    p, request = close_crossing_a_request(profile, closer)
    p.step(closer)  # the close request reaches the sender, whose own request awaits its answer: refused
    p.deliver(closer, request)  # the crossing request, accepted by the closer
    closes_cleanly(p, closer)
    assert CloseRefused(115) in p.events[closer]
    assert received(p.events[closer]) == [MESSAGE]


# --- a close in the middle of a message fails, at both ends -------------------------------------


def _hold_the_mac_until_the_close(p: ConnectionPair, sender: Role, *, drop: bool) -> None:
    """A tap that drops the sender's MAC, or delivers it after the sender's close request (swap)."""
    held: list[bytes] = []

    def tap(role: Role, f: Frame) -> list[bytes]:
        if role is sender and f.is_(MessageId.MAC_TRANSMISSION_NOTIF):
            held.append(f.raw)
            return []
        if role is sender and f.is_(MessageId.LINE_DISCONNECTION_RQ) and not drop:
            return [f.raw, *held]
        return [f.raw]

    p.intercept = tap


@pytest.mark.parametrize("drop", [True, False], ids=["mac-dropped", "mac-after-close"])
@pytest.mark.parametrize("sender", ROLES, ids=lambda r: f"{r.value}-sends")
def test_a_close_request_before_the_mac_is_a_truncation_at_both_ends(
    profile: Profile, sender: Role, drop: bool
) -> None:
    p = ready(profile)
    receiver = other(sender)
    _hold_the_mac_until_the_close(p, sender, drop=drop)
    p.conn(sender).send_message(MESSAGE)
    p.conn(sender).close()
    p.pump(raise_errors=False)
    assert p.errors[receiver].code is ErrorCode.TRUNCATED
    assert "cut short" in str(p.errors[receiver])
    (rp,) = p.sent_by(receiver, MessageId.LINE_DISCONNECTION_RP)
    assert (rp.option, rp.err_no) == (wire.NAK, nak_err_no(profile, ErrorCode.TRUNCATED))
    assert p.errors[sender].code is ErrorCode.TRUNCATED  # told by the NAK: no Closed, no success
    assert received(p.events[receiver]) == []
    assert not any(isinstance(e, Closed) for role in ROLES for e in p.events[role])


@V100_ONLY
@pytest.mark.parametrize("sender", ROLES, ids=lambda r: f"{r.value}-sends")
def test_a_close_request_while_our_accepted_message_is_on_its_way_is_a_truncation(
    profile: Profile, sender: Role
) -> None:
    p = ready(profile)
    advance(p, sender, "accepted")
    injected = wire.frame(MessageId.LINE_DISCONNECTION_RQ)
    p.deliver(sender, injected, raise_errors=False)
    assert p.errors[sender].code is ErrorCode.TRUNCATED
    assert "our message" in str(p.errors[sender])


@V100_ONLY
@pytest.mark.parametrize("closer", ROLES, ids=lambda r: r.value)
def test_an_acceptance_of_our_close_while_the_peers_message_comes_in_is_a_truncation(
    profile: Profile, closer: Role
) -> None:
    """V1.00 cannot tell a forged acceptance, but it can tell that it arrived mid-message."""
    p, request = close_crossing_a_request(profile, closer)
    everything_to_send(p.conn(closer))  # the close request, dropped on its way
    p.deliver(closer, request)  # the crossing request is accepted: its message is now coming in
    forged = wire.frame(MessageId.LINE_DISCONNECTION_RP, wire.encode_status(0))
    p.deliver(closer, forged, raise_errors=False)
    assert p.errors[closer].code is ErrorCode.TRUNCATED


# --- an injected, replayed or early disconnection ---------------------------------------------


@pytest.mark.parametrize("target", ROLES, ids=lambda r: r.value)
def test_an_injected_close_request(profile: Profile, target: Role) -> None:
    """Hardened refuses it (127) and both ends fail; V1.00 cannot tell it from the peer's (security.md)."""
    p = ready(profile)
    p.conn(other(target)).send_message(b"first")
    p.pump()
    size = p.server.profile.layout.disconnection_mac_size
    p.deliver(target, wire.frame(MessageId.LINE_DISCONNECTION_RQ, bytes(size)), raise_errors=False)
    p.pump(raise_errors=False)
    if profile is Profile.HARDENED:
        assert p.errors[target].code is ErrorCode.BAD_DISCONNECTION
        assert "forged" in str(p.errors[target])
        assert p.errors[other(target)].code is ErrorCode.BAD_MESSAGE_ID  # an answer to a request it never made
        assert not any(isinstance(e, Closed) for e in p.events[target])
    else:
        assert p.events[target][-1] == Closed(by_peer=True)
        assert p.errors[other(target)].code is ErrorCode.BAD_MESSAGE_ID


@HARDENED_ONLY
def test_a_replayed_close_request_does_not_verify_once_a_message_has_passed(profile: Profile) -> None:
    p = ConnectionPair(cfg(profile, accept_close=False), cfg(profile))
    p.handshake()
    p.client.close()
    assert p.pump().client == [CloseRefused(115)]
    (recorded,) = p.sent_by(Role.CLIENT, MessageId.LINE_DISCONNECTION_RQ)
    p.client.send_message(b"one more")
    p.pump()
    p.deliver(Role.SERVER, recorded.raw, raise_errors=False)
    assert p.errors[Role.SERVER].code is ErrorCode.BAD_DISCONNECTION


def _lose_a_whole_message(p: ConnectionPair, sender: Role) -> None:
    """An attacker drops a message's request, forges the acceptance, and drops the blocks and MAC."""
    p.conn(sender).send_message(b"never arrives")
    everything_to_send(p.conn(sender))
    acceptance = wire.TransmissionRp(0, wire.DEFAULT_MAX_MESSAGE).encode()
    p.deliver(sender, wire.frame(MessageId.MESSAGE_TRANSMISSION_RP, acceptance))
    everything_to_send(p.conn(sender))


@pytest.mark.parametrize("sender", ROLES, ids=lambda r: f"{r.value}-sends")
def test_a_whole_message_lost_is_caught_by_the_disconnection(profile: Profile, sender: Role) -> None:
    p = ready(profile)
    _lose_a_whole_message(p, sender)
    p.conn(sender).close()
    p.pump(raise_errors=False)
    if profile is Profile.HARDENED:
        assert p.errors[other(sender)].code is ErrorCode.BAD_DISCONNECTION
        assert "sent 0 and received 0" in str(p.errors[other(sender)])
        assert p.errors[sender].code is ErrorCode.BAD_DISCONNECTION  # told by the NAK
    else:  # V1.00's disconnection carries nothing to check (security.md)
        assert p.events[sender][-1] == Closed(by_peer=False)


@pytest.mark.parametrize("closer", ROLES, ids=lambda r: r.value)
def test_a_forged_acceptance_of_our_close(profile: Profile, closer: Role) -> None:
    p = ready(profile)
    p.conn(other(closer)).send_message(b"counted")
    p.pump()
    p.conn(closer).close()
    everything_to_send(p.conn(closer))  # the request never reaches the peer
    size = p.server.profile.layout.disconnection_mac_size
    forged = wire.frame(MessageId.LINE_DISCONNECTION_RP, wire.encode_status(0) + bytes(size))
    p.deliver(closer, forged, raise_errors=False)
    if profile is Profile.HARDENED:
        assert p.errors[closer].code is ErrorCode.BAD_DISCONNECTION
    else:
        assert p.events[closer][-1] == Closed(by_peer=False)
        p.eof(other(closer))  # the peer never asked for anything, and finds the link gone
        assert p.errors[other(closer)].code is ErrorCode.CONNECTION_LOST


@HARDENED_ONLY
def test_disconnection_macs_name_their_sender(profile: Profile) -> None:
    """A close request reflected back to its sender does not verify (the MAC names who made it)."""
    p = ready(profile)
    p.client.close()
    own_request = everything_to_send(p.client)
    p.deliver(Role.CLIENT, own_request, raise_errors=False)  # both asked, but this one is the client's own
    assert p.errors[Role.CLIENT].code is ErrorCode.BAD_DISCONNECTION
