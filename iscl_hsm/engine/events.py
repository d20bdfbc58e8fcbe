"""Events: what the engine tells the application happened. Frozen, so they can be logged and compared."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..wire import Encryption, Mac
from .config import Profile


@dataclass(frozen=True, slots=True)
class LinkParameters:
    """What both ends agreed on; printed by `iscl client`/`iscl server` and logged by the gateway."""

    version: str
    block_length: int
    auth_key_id: int
    enc_key_id: int
    encryption: Encryption
    mac: Mac
    peer_auth_data: bytes = field(repr=False)
    profile: Profile = Profile.V100


class Event:
    """Base class of everything :meth:`Connection.receive_data` returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class LinkReady(Event):
    """Mutual authentication completed; messages may flow both ways."""

    parameters: LinkParameters


@dataclass(frozen=True, slots=True)
class MessageReceived(Event):
    """A whole secured message whose MAC verified. ``data`` is never shown in a repr."""

    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class NonSecureReceived(Event):
    """A through-mode (unprotected) message; only when the application enabled through mode."""

    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class MessageSent(Event):
    """The peer accepted our message and every block and the MAC are in the output."""

    length: int


@dataclass(frozen=True, slots=True)
class MessageRefused(Event):
    """The peer answered NAK to our message; the link stays up. ``peer_max_length`` is its limit."""

    code: int
    length: int
    peer_max_length: int


@dataclass(frozen=True, slots=True)
class CloseRefused(Event):
    """The peer refused our line disconnection request; the link stays up."""

    code: int


@dataclass(frozen=True, slots=True)
class Closed(Event):
    """The line disconnection protocol completed; close the socket after sending data_to_send()."""

    by_peer: bool
