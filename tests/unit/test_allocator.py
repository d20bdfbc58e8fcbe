"""keep_bulk_buffers: freed megabyte buffers are reused instead of faulted in again."""

from __future__ import annotations

import subprocess
import sys

COUNT_FAULTS = """
import resource, sys
from iscl_hsm.allocator import keep_bulk_buffers
tuned = keep_bulk_buffers() if sys.argv[1] == "tuned" else None
data = bytes(1 << 20)
bytes(bytearray(data))  # warm up
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    bytes(bytearray(data))  # two fresh megabytes, freed at once
print(tuned, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 20)
"""


def _faults_per_round(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", COUNT_FAULTS, mode], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    return out[0], int(out[1])


def test_tuned_processes_reuse_freed_megabytes() -> None:
    tuned, faults = _faults_per_round("tuned")
    assert tuned == "True", "glibc's mallopt is expected on Debian"
    pages_per_round = 2 * (1 << 20) // 4096
    assert faults < pages_per_round // 10, f"{faults} page faults per round of two fresh megabytes"


def test_untuned_processes_fault_the_pages_in_again() -> None:
    """The reason for the tuning: without it every round touches fresh pages (glibc defaults)."""
    _, faults = _faults_per_round("default")
    assert faults > 2 * (1 << 20) // 4096 // 2
