"""An exclusive lock on an open file, on POSIX and on Windows.

The demo token's creation and the audit log's appends take it so that two processes never interleave.
fcntl exists only on POSIX and msvcrt only on Windows, so neither is imported before the lock is taken:
every module of iscl_hsm imports on both (tests/unit/test_portable_imports.py).
"""

from __future__ import annotations

import errno
from typing import IO, Any

# Windows locks byte ranges, and other processes cannot read a locked range: lock one byte far past
# anything these files hold, so that readers of the audit log are never refused.
_WINDOWS_LOCK_OFFSET = 1 << 30


def lock_exclusive(handle: IO[Any]) -> None:
    """Wait until this process holds the only lock on ``handle``'s file; closing the file releases it."""
    try:
        import fcntl
    except ImportError:
        _lock_windows(handle)
    else:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)


def _lock_windows(handle: IO[Any]) -> None:
    import msvcrt  # type: ignore[import-not-found,unused-ignore]

    position = handle.tell()
    handle.seek(_WINDOWS_LOCK_OFFSET)
    try:
        while True:
            try:
                msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)  # type: ignore[attr-defined,unused-ignore]
                return
            except OSError as exc:  # LK_LOCK gives up after ten one-second tries: keep waiting
                if exc.errno != errno.EDEADLOCK:
                    raise
    finally:
        handle.seek(position)
