"""The two state tables, walked pair by pair: every (state, message) either has a handler or is
refused on its header with 104, before any payload is read; and the normal flows land where the
tables say."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import pytest

from iscl_hsm import wire
from iscl_hsm.engine import Connection, Inbound, Outbound, Profile, Role, State, handshake, transfer
from iscl_hsm.errors import ErrorCode, RemoteProtocolError
from iscl_hsm.wire import MessageId
from tests.helpers import ConnectionPair, cfg, other, split_frames

HANDSHAKE_STATES = {
    Role.SERVER: [State.SERVER_START, State.SERVER_WAIT_LINE_RP, State.SERVER_WAIT_AUTH_RQ, State.SERVER_WAIT_PASS2,
                  State.SERVER_WAIT_COMPLETION],
    Role.CLIENT: [State.CLIENT_WAIT_LINE_RQ, State.CLIENT_WAIT_AUTH_RP, State.CLIENT_WAIT_PASS1, State.CLIENT_WAIT_PASS3],
}


def _pair(profile: Profile, **settings: object) -> ConnectionPair:
    config = cfg(profile, max_block=64, through_mode=True, **settings)
    return ConnectionPair(config, config)


def _one_by_one(p: ConnectionPair, after_each: Callable[[], bool]) -> bool:
    """Deliver frames one at a time, alternating ends, until ``after_each()`` is true (True) or all is quiet."""
    for _ in range(100):
        moved = False
        for sender in Role:
            for frame in split_frames(p.conn(sender).data_to_send()):
                moved = True
                p.conn(other(sender)).receive_data(frame.raw)
                if after_each():
                    return True
        if not moved:
            return False
    raise AssertionError("the pair never went quiet")


def _until(p: ConnectionPair, done: Callable[[], bool]) -> None:
    assert done() or _one_by_one(p, done), "the state was never reached"


def handshake_at(profile: Profile, role: Role, state: State) -> Connection:
    p = _pair(profile)
    if state is not State.SERVER_START:
        p.server.initiate()
    _until(p, lambda: p.conn(role).state is state)
    return p.conn(role)


def _accepts_header(conn: Connection, mid: MessageId) -> bool:
    """Feed only a header announcing 8 payload bytes: True if the connection waits for them."""
    try:
        assert conn.receive_data(wire.Header(mid, 8).encode()) == []
    except RemoteProtocolError as exc:
        assert exc.code is ErrorCode.BAD_MESSAGE_ID, exc
        return False
    return True


@pytest.mark.parametrize("mid", list(MessageId), ids=lambda m: m.name)
@pytest.mark.parametrize(
    ("role", "state"), [(r, s) for r in Role for s in HANDSHAKE_STATES[r]], ids=lambda x: getattr(x, "name", x)
)
def test_every_handshake_state_and_message(profile: Profile, role: Role, state: State, mid: MessageId) -> None:
    conn = handshake_at(profile, role, state)
    assert _accepts_header(conn, mid) is ((state, mid) in handshake.TABLE)


# --- the transfer machine ------------------------------------------------------------------------------


def _ready(profile: Profile, **settings: object) -> ConnectionPair:
    p = _pair(profile, **settings)
    p.handshake()
    return p


def _request(p: ConnectionPair, sender: Role, data: bytes = bytes(200)) -> None:
    p.conn(sender).send_message(data)
    p.conn(other(sender)).receive_data(p.conn(sender).data_to_send())


def _reach(profile: Profile, machine_state: Enum) -> Connection:
    """A server whose transfer machine is in ``machine_state`` (the other machines idle, or as needed)."""
    session = {"enc_key_id": wire.SESSION_KEYS}
    if machine_state in (State.READY, Inbound.IDLE, Outbound.IDLE):
        return _ready(profile).server
    if machine_state is State.CLOSING:
        p = _ready(profile)
        p.server.close()
        return p.server
    if machine_state is State.CLOSED:
        p = _ready(profile)
        p.server.close()
        p.pump()
        return p.server
    if machine_state is Inbound.RECEIVING:
        p = _ready(profile)
        _request(p, Role.CLIENT)
        return p.server
    if machine_state is Inbound.AWAIT_RANDOM:
        p = _ready(profile, **session)
        _request(p, Role.CLIENT)
        return p.server
    if machine_state is Inbound.HELD:  # two requests crossed: the server's goes first
        p = _ready(profile)
        p.server.send_message(bytes(10))
        p.server.data_to_send()
        _request(p, Role.CLIENT)
        return p.server
    if machine_state is Outbound.AWAIT_ANSWER:
        p = _ready(profile)
        p.server.send_message(bytes(10))
        p.server.data_to_send()
        return p.server
    if machine_state is Outbound.AWAIT_RANDOM_ANSWER:
        p = _ready(profile, **session)
        _request(p, Role.SERVER)
        p.server.receive_data(p.client.data_to_send())
        return p.server
    assert machine_state is Outbound.STREAMING
    p = _ready(profile)
    _request(p, Role.SERVER, bytes(10_000))
    p.server.receive_data(p.client.data_to_send())
    return p.server


def _transfer_states(profile: Profile) -> list[Enum]:
    inbound = [s for s in Inbound if profile is Profile.V100 or s is not Inbound.HELD]  # HELD: V1.00 only
    return [*inbound, *Outbound, State.READY, State.CLOSING, State.CLOSED]


def _machine_of(state: Enum) -> frozenset[MessageId]:
    if isinstance(state, Inbound):
        return transfer._INBOUND
    if isinstance(state, Outbound):
        return transfer._OUTBOUND
    return frozenset(MessageId) - transfer._INBOUND - transfer._OUTBOUND


def test_hardened_never_holds_a_request() -> None:
    """Only V1.00 has the HELD state: hardened answers crossing requests at once (full duplex)."""
    p = _ready(Profile.HARDENED)
    p.server.send_message(bytes(10))
    p.server.data_to_send()
    _request(p, Role.CLIENT)
    assert p.server.inbound is Inbound.RECEIVING


@pytest.mark.parametrize("mid", list(MessageId), ids=lambda m: m.name)
@pytest.mark.parametrize("profile", list(Profile), ids=lambda p: p.value)
def test_every_transfer_state_and_message(profile: Profile, mid: MessageId) -> None:
    for state in _transfer_states(profile):
        if mid not in _machine_of(state):
            continue
        conn = _reach(profile, state)
        current = {Inbound: conn.inbound, Outbound: conn.outbound, State: conn.state}[type(state)]
        assert current is state, (state, current)
        expected = (state, mid) in transfer.TABLE and conn.state is not State.CLOSED
        assert _accepts_header(conn, mid) is expected, (state, mid)


@pytest.mark.parametrize("mid", [m for m in MessageId if m not in transfer._INBOUND | transfer._OUTBOUND
                                 and m not in (MessageId.THROUGH_MODE_TRANSMISSION_NOTIF,
                                               MessageId.LINE_DISCONNECTION_RQ, MessageId.LINE_DISCONNECTION_RP)],
                         ids=lambda m: m.name)
def test_handshake_messages_are_refused_once_the_link_is_up(profile: Profile, mid: MessageId) -> None:
    assert not _accepts_header(_ready(profile).client, mid)


def test_the_tables_name_a_handler_for_every_entry() -> None:
    for table in (handshake.TABLE, transfer.TABLE):
        for (state, mid), (handler, target) in table.items():
            assert callable(handler) and isinstance(mid, MessageId)
            assert type(target) is type(state), (state, mid, target)  # a machine moves within itself


def test_normal_flows_land_where_the_transfer_table_says(profile: Profile) -> None:
    """A request, its acceptance, the random number, the blocks and the MAC walk both machines through
    their table, one frame at a time."""
    p = _ready(profile, enc_key_id=wire.SESSION_KEYS)
    p.client.send_message(bytes(200))
    seen: list[tuple[Outbound | None, Inbound | None]] = [(p.client.outbound, p.server.inbound)]

    def note() -> bool:
        if (p.client.outbound, p.server.inbound) != seen[-1]:
            seen.append((p.client.outbound, p.server.inbound))
        return False

    _one_by_one(p, note)
    assert seen == [
        (Outbound.AWAIT_ANSWER, Inbound.IDLE),
        (Outbound.AWAIT_ANSWER, Inbound.AWAIT_RANDOM),  # the request, accepted
        (Outbound.AWAIT_RANDOM_ANSWER, Inbound.AWAIT_RANDOM),  # the acceptance; the random number goes out
        (Outbound.AWAIT_RANDOM_ANSWER, Inbound.RECEIVING),  # the random number
        (Outbound.STREAMING, Inbound.RECEIVING),  # its answer; the blocks
        (Outbound.IDLE, Inbound.IDLE),  # the MAC: out (the sealer is done), then verified
    ]
