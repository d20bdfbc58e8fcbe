"""What the blocking and asyncio transports share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..engine import MessageRefused, Waiting
from ..errors import ErrorCode, IsclError, RemoteProtocolError

READ_SIZE = 64 * 1024
"""Bytes read from the socket at a time: several communication blocks per engine call."""


class MessageRefusedError(IsclError):
    """The peer answered NAK to a message; the link stays up. ``peer_max_length`` is its limit."""

    def __init__(self, code: ErrorCode, length: int, peer_max_length: int) -> None:
        super().__init__(
            code,
            f"the peer refused a message of {length} bytes ({code.name}; its maximum is"
            f" {peer_max_length} bytes and the algorithms must match on both ends)",
        )
        self.length = length
        self.peer_max_length = peer_max_length


@dataclass(frozen=True)
class Timeouts:
    """Seconds a link waits for the peer, by what it waits for (None: for ever).

    Each read is bounded by the timeout of what the engine waits for at that moment
    (:attr:`Connection.waiting <iscl_hsm.engine.Connection.waiting>`), counted from the last bytes
    that arrived; ``handshake`` also bounds the handshake as a whole, and ``message`` a peer that
    takes none of our data (its receive window stays full). So no fault of the peer leaves a link
    waiting for ever, unless a timeout is None.
    """

    handshake: float | None = 30.0
    """The whole handshake (a card may need a few seconds of it)."""
    answer: float | None = 30.0
    """The peer's answer to our message request, or to its session-key random number."""
    message: float | None = 30.0
    """The next block or the MAC of a message the peer is sending; or the peer taking our data."""
    close: float | None = 30.0
    """The answer to our line disconnection request."""
    idle: float | None = 12 * 3600.0
    """Nothing owed either way: an idle link is dropped after this long."""

    def of(self, waiting: Waiting) -> float | None:
        """The timeout for a read while the engine waits for ``waiting``."""
        return None if waiting is Waiting.NOTHING else getattr(self, waiting.value)

    def expired(self, waiting: Waiting, peer: object) -> RemoteProtocolError:
        """The error of a link whose peer sent nothing within the timeout for ``waiting``."""
        limit = self.of(waiting)
        return RemoteProtocolError(
            ErrorCode.TIMED_OUT,
            f"{peer} sent nothing for {limit:g} s while this end waited for {_AWAITED[waiting]};"
            f" the link was dropped (--{waiting.value}-timeout sets the limit)",
        )

    def stalled(self, peer: object) -> RemoteProtocolError:
        """The error of a link whose peer took none of our data within the message timeout."""
        return RemoteProtocolError(
            ErrorCode.TIMED_OUT,
            f"{peer} took none of our data for {self.message:g} s; the link was dropped"
            " (--message-timeout sets the limit)",
        )


DEFAULT_TIMEOUTS = Timeouts()

_AWAITED = {
    Waiting.HANDSHAKE: "the next handshake message",
    Waiting.ANSWER: "the answer to its message request",
    Waiting.MESSAGE: "the rest of the peer's message (its next block or its MAC)",
    Waiting.CLOSE: "the answer to its line disconnection request",
    Waiting.IDLE: "anything (the link was idle)",
    Waiting.NOTHING: "nothing",
}


def refused_error(event: MessageRefused) -> MessageRefusedError:
    code = ErrorCode(event.code) if event.code in ErrorCode._value2member_map_ else ErrorCode.RECEIVED_NAK
    return MessageRefusedError(code, event.length, event.peer_max_length)


@dataclass(frozen=True)
class Address:
    """A TCP endpoint, printed as host:port ([v6]:port)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def of(cls, peername: Any) -> Address:
        """From a socket's peername; '?' when the socket is already gone."""
        if not peername:
            return cls("?", 0)
        return cls(str(peername[0]), int(peername[1]))

    @classmethod
    def parse(cls, text: str) -> Address:
        """HOST:PORT or [V6]:PORT; ValueError names the text."""
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{text!r} is not HOST:PORT")
        return cls(host.strip("[]"), int(port))
