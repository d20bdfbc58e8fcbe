"""The sans-I/O ISCL engine."""

from .config import Config, Role
from .connection import DEFAULT_GUARD, ChallengeGuard, Connection, State
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

__all__ = [
    "DEFAULT_GUARD",
    "ChallengeGuard",
    "CloseRefused",
    "Closed",
    "Config",
    "Connection",
    "Event",
    "LinkParameters",
    "LinkReady",
    "MessageReceived",
    "MessageRefused",
    "MessageSent",
    "NonSecureReceived",
    "Role",
    "State",
]
