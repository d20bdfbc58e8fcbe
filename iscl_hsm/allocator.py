"""Keep freed bulk buffers inside the process, so that each megabyte message does not page-fault anew.

glibc gives large freed blocks straight back to the kernel (its mmap and trim thresholds), so the
next message of the same size touches fresh pages: on a small virtual machine that costs about as
much per megabyte as ten copies, a few percent of a DES-CBC link's rate and most of an unencrypted
one's overhead. The command line calls :func:`keep_bulk_buffers` at start-up; an application that
moves large messages through iscl_hsm may call it too. It changes only how much freed memory the
process keeps for reuse (up to :data:`TRIM_THRESHOLD` above the highest block in use).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024
"""Blocks below this come from the heap, where freed memory is reused (glibc's maximum)."""
TRIM_THRESHOLD = 64 * 1024 * 1024
"""Free memory at the top of the heap kept before any is returned to the kernel."""


def keep_bulk_buffers() -> bool:
    """Tune glibc's malloc for bulk messages; False (and nothing changed) without glibc's mallopt."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
