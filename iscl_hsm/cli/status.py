"""Exit statuses: the one place that turns an expected failure into the status a command exits with.

The tunnel and service commands exit 78 (EX_CONFIG) when the key holder is not as the options say,
since the systemd units name 78 in RestartPreventExitStatus= (a wrong PIN must never be retried
until a hardware token locks it). ``iscl keys`` documents its own statuses for security officers and
their scripts (docs/security-officer.md, section 9).
"""

from __future__ import annotations

from ..errors import ErrorCode, IsclError, KeyHolderConfigError

EXIT_OK = 0
EXIT_FAILURE = 1
"""Something failed; for ``iscl keys``: a check failed (a KCV, the audit chain, a key file), a
confirmation was refused, or the key is not there."""
EXIT_USAGE = 2
"""``iscl keys`` (and argparse for every command): the command as typed cannot be carried out."""
EXIT_UNAVAILABLE = 3
"""``iscl keys``: the token cannot be used: no such token or module, a wrong or locked PIN."""
EXIT_CONFIG = 78
"""sysexits.h's EX_CONFIG: a wrong or locked PIN, no such token, card or key (KeyHolderConfigError).
Running the command again cannot help, so the systemd units do not restart on it."""
KEY_STATES = frozenset({ErrorCode.KEY_NOT_FOUND, ErrorCode.KEY_EXPIRED})
"""KeyHolderConfigError codes about one key, not about reaching the token."""


def exit_status(command: str, failure: IsclError) -> int:
    """The exit status of ``iscl COMMAND`` that failed with ``failure`` (one sentence on stderr)."""
    if command != "keys":
        return EXIT_CONFIG if isinstance(failure, KeyHolderConfigError) else EXIT_FAILURE
    if failure.code is ErrorCode.BAD_OPTION:
        return EXIT_USAGE
    if isinstance(failure, KeyHolderConfigError) and failure.code not in KEY_STATES:
        return EXIT_UNAVAILABLE
    return EXIT_FAILURE
