"""The sans-I/O ISCL engine."""

from ..wire import Md5Order
from .config import Config, Profile, Role
from .connection import Connection
from .events import (
    Closed,
    CloseRefused,
    Event,
    LinkParameters,
    LinkReady,
    MessageReceived,
    MessageRefused,
    MessageSent,
    NonSecureReceived,
)
from .handshake import DEFAULT_GUARD, ChallengeGuard
from .profile import check_key_holder
from .state import Inbound, Outbound, State, Waiting

__all__ = [
    "DEFAULT_GUARD",
    "ChallengeGuard",
    "CloseRefused",
    "Closed",
    "Config",
    "Connection",
    "Event",
    "Inbound",
    "LinkParameters",
    "LinkReady",
    "Md5Order",
    "MessageReceived",
    "MessageRefused",
    "MessageSent",
    "NonSecureReceived",
    "Outbound",
    "Profile",
    "Role",
    "State",
    "Waiting",
    "check_key_holder",
]
