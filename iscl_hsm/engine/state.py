"""The states of a link: the handshake's, then the transfer's (one per direction) and the link's."""

from __future__ import annotations

from enum import Enum, auto


class State(Enum):
    """Where the link is; ``READY`` is the only state in which messages start."""

    SERVER_START = auto()
    SERVER_WAIT_LINE_RP = auto()
    SERVER_WAIT_AUTH_RQ = auto()
    SERVER_WAIT_PASS2 = auto()
    SERVER_WAIT_COMPLETION = auto()
    CLIENT_WAIT_LINE_RQ = auto()
    CLIENT_WAIT_AUTH_RP = auto()
    CLIENT_WAIT_PASS1 = auto()
    CLIENT_WAIT_PASS3 = auto()
    READY = auto()
    CLOSING = auto()  # we sent LINE_DISCONNECTION_RQ
    CLOSED = auto()
    ERROR = auto()


HANDSHAKE_STATES = frozenset(State) - {State.READY, State.CLOSING, State.CLOSED, State.ERROR}


class Outbound(Enum):
    """Our current message, once the link is up."""

    IDLE = auto()
    AWAIT_ANSWER = auto()  # MESSAGE_TRANSMISSION_RQ sent
    AWAIT_RANDOM_ANSWER = auto()  # RNDNO_FOR_SESSION_KEY_RQ sent
    STREAMING = auto()  # accepted: blocks and then the MAC go out


class Inbound(Enum):
    """The peer's current message, once the link is up."""

    IDLE = auto()
    HELD = auto()  # V1.00: a crossing client request waits until our own transmission is over
    AWAIT_RANDOM = auto()  # accepted under session keys: the random number comes next
    RECEIVING = auto()  # accepted: blocks and then the MAC come in


class Waiting(Enum):
    """What a link waits for from the peer, so that a transport knows which of its timeouts applies.

    The engine has no clock; a transport reads :attr:`Connection.waiting
    <iscl_hsm.engine.Connection.waiting>` after every call and bounds its next read by that timeout.
    """

    HANDSHAKE = "handshake"  # the next handshake message
    ANSWER = "answer"  # the answer to our message request (or to its session-key random number)
    MESSAGE = "message"  # the rest of the peer's message: its next block, its random number or its MAC
    CLOSE = "close"  # the answer to our line disconnection request
    IDLE = "idle"  # nothing is owed either way
    NOTHING = "nothing"  # the link is closed or failed
