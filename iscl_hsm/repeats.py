"""Rate-limiting of repeated log lines: a peer that fails its handshake a thousand times gets a count,
not a thousand lines (a scanner or a misconfigured device would otherwise flood the log).

Keys name a peer and a kind of failure (:func:`failure_key`), so a different failure from the same
peer is still shown at once."""

from __future__ import annotations

import time
from collections.abc import Callable

from .errors import error_name

WINDOW = 60.0
"""Seconds during which further failures of the same peer are counted rather than shown."""


class RepeatFilter:
    """Says, per key (a peer's host), whether to show the next line: the first in each window is shown."""

    def __init__(self, window: float = WINDOW, clock: Callable[[], float] = time.monotonic) -> None:
        self._window = window
        self._clock = clock
        self._shown: dict[str, float] = {}  # key -> when its last line was shown
        self._unshown: dict[str, int] = {}

    def admit(self, key: str) -> int | None:
        """None: count this one and show nothing; else show it, with this many not shown before it."""
        now = self._clock()
        last = self._shown.get(key)
        if last is not None and now - last < self._window:
            self._unshown[key] = self._unshown.get(key, 0) + 1
            return None
        self._forget(now)
        self._shown[key] = now
        return self._unshown.pop(key, 0)

    def failure(self, host: str, error: BaseException, line: str) -> str | None:
        """``line`` (about ``error`` from ``host``) as it should be shown, or None to show nothing."""
        unshown = self.admit(failure_key(host, error))
        if unshown is None:
            return None
        return f"{line} ({unshown} more like it from {host} not shown)" if unshown else line

    def _forget(self, now: float) -> None:
        """Drop keys silent for a whole window that have nothing left to report (bounds memory)."""
        for key in [k for k, t in self._shown.items() if now - t >= self._window and k not in self._unshown]:
            del self._shown[key]


def failure_key(host: str, error: BaseException) -> str:
    """The key of a failure: the peer's host and the error's kind (its ISCL error name, or its type)."""
    return f"{host} {error_name(error)}"
