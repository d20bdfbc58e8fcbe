"""Error codes and exceptions.

Codes 100..115 are the LEADTOOLS DICOM SDK's ISCL error numbers (public record); 120 and up are this
project's additions. Every exception carries its code, and protocol errors carry the code that goes
back to the peer in the ErrNo field of a NAK.

The texts never contain key material, PINs or message data: they name the thing at fault and what
to do about it.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum


class ErrorCode(IntEnum):
    """Why an ISCL operation failed."""

    BAD_OPTION = 100
    BAD_LENGTH = 101
    LOCAL_KEY_HOLDER = 102  # SDK: "local IC card"
    REMOTE_KEY_HOLDER = 103  # SDK: "remote IC card"
    BAD_MESSAGE_ID = 104
    BAD_VERSION = 105
    BAD_AUTH_METHOD = 106
    BAD_BLOCK_LENGTH = 107
    RECEIVED_NAK = 108
    TRANSMISSION_MISMATCH = 109  # encryption / MAC / key id the receiver does not accept
    PEER_LENGTH_TOO_SMALL = 110
    LOCAL_LENGTH_TOO_SMALL = 111
    DECRYPT = 112  # padding could not be cleared
    BAD_MAC = 113
    RANDOM_NUMBER_EXPECTED = 114
    PEER_REFUSED_CLOSE = 115
    # This project's additions.
    AUTHENTICATION_FAILED = 120
    REFLECTED_CHALLENGE = 121
    CONNECTION_LOST = 122
    BAD_STATE = 123
    THROUGH_MODE_DISABLED = 124
    KEY_NOT_FOUND = 125
    TRUNCATED = 126  # a disconnection, or the peer's request to disconnect, in the middle of a message
    BAD_DISCONNECTION = 127  # hardened: a disconnection whose MAC or message counts do not verify
    TIMED_OUT = 128  # the peer sent nothing within the timeout for what this end was waiting for
    KCV_MISMATCH = 129  # a key's check value is not the one expected (`iscl keys check`, a wrapped key)
    AUDIT_LOG = 130  # the audit log cannot be written, or its hash chain is broken
    KEY_EXPIRED = 131  # the key version is past its not-after (`iscl keys ... --not-after`)
    NOT_CONFIRMED = 132  # the security officer or a custodian did not confirm; nothing was changed
    BAD_KEY_FILE = 133  # a wrapped-key file is damaged, or its key does not unwrap


class IsclError(Exception):
    """Base class: every error raised by iscl_hsm carries an :class:`ErrorCode`."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        #: Events the engine produced in the same call before the failure (verified messages are
        #: among them and may still be delivered).
        self.events: Sequence[object] = ()

    def __str__(self) -> str:
        return f"{super().__str__()} [ISCL {int(self.code)} {self.code.name}]"


class LocalProtocolError(IsclError):
    """The application asked for something the protocol does not allow in this state."""


class RemoteProtocolError(IsclError):
    """The peer sent something wrong, or the link broke; the link is dead after this."""


class KeyHolderError(IsclError):
    """The token, card or key file failed; the message names it and says what to do."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.LOCAL_KEY_HOLDER) -> None:
        super().__init__(code, message)


class KeyHolderConfigError(KeyHolderError):
    """The key holder is not as the options say: a wrong or locked PIN, an unreadable PIN file, no such
    module, token, card or key. Trying again cannot help, a person must act; so the ``iscl`` commands
    exit with status 78 (EX_CONFIG), which the systemd units name in RestartPreventExitStatus= so that
    a wrong PIN is never retried until a hardware token locks it (``iscl keys``: 3, or 1 for a missing
    or expired key; see :mod:`iscl_hsm.cli.status`)."""


def error_name(failure: BaseException) -> str:
    """A failure's kind for logs, metrics and rate limits: its ISCL error name, or its exception type."""
    return failure.code.name if isinstance(failure, IsclError) else type(failure).__name__
