"""What the blocking and asyncio transports share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..engine import MessageRefused
from ..errors import ErrorCode, IsclError

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
