"""Tell a service manager how the process is doing: systemd's sd_notify protocol, without libsystemd.

systemd starts a ``Type=notify`` unit with ``$NOTIFY_SOCKET`` naming an AF_UNIX datagram socket (a
path, or ``@name`` in the abstract namespace); each datagram holds newline-separated ``KEY=value``
assignments. ``READY=1`` ends the start (systemd starts units ordered after this one only then),
``STOPPING=1`` and ``RELOADING=1`` report a stop and a reload under way, and ``STATUS=...`` is the line
``systemctl status`` shows. Without ``$NOTIFY_SOCKET`` every call does nothing, so the same code runs
from a terminal, under another service manager, and on systems without AF_UNIX.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"


def notify(*assignments: str) -> bool:
    """Send ``KEY=value`` assignments in one datagram; True if a service manager got them.

    A service manager that cannot be reached is logged, never raised: the service runs on, and systemd
    reports a missing READY=1 by its own start timeout.
    """
    address = os.environ.get(NOTIFY_SOCKET)
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # the abstract namespace
    message = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", os.environ[NOTIFY_SOCKET], exc)
        return False
    return True


def _status(text: str) -> str:
    """A STATUS= assignment; a line break would end it early, so it becomes a space."""
    return "STATUS=" + " ".join(text.splitlines())


def ready(status: str) -> bool:
    """The service is up (it accepts connections): ``READY=1`` with ``status`` for ``systemctl status``."""
    return notify("READY=1", _status(status))


def stopping(status: str) -> bool:
    """The service is stopping (draining), as ``status`` says."""
    return notify("STOPPING=1", _status(status))


@contextlib.contextmanager
def reloading(status: str) -> Iterator[None]:
    """Around a reload: ``RELOADING=1`` before it and ``READY=1`` with ``status`` after it, also when it
    fails (a failed reload keeps the old state, which still serves). MONOTONIC_USEC lets a systemd that
    knows Type=notify-reload (253 and later) match the reload to its request; older ones ignore it."""
    notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        yield
    finally:
        ready(status)


__all__ = ["NOTIFY_SOCKET", "notify", "ready", "reloading", "stopping"]
