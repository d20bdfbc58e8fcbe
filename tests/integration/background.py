"""A command running in the background with its stderr collected line by line (CLI and DICOM tests)."""

from __future__ import annotations

import queue
import re
import subprocess
import threading
from collections.abc import Sequence
from typing import IO, Any

import pytest

TIMEOUT = 120.0
"""Seconds to wait for a line or an exit: a safety net against hangs, never an assertion."""


class Background:
    """``argv`` started with ``env``; stdout goes to ``stdout`` (default: nowhere)."""

    def __init__(
        self,
        argv: Sequence[object],
        env: dict[str, str],
        *,
        stdin: IO[Any] | int = subprocess.DEVNULL,
        stdout: IO[Any] | int = subprocess.DEVNULL,
    ) -> None:
        self.proc = subprocess.Popen(
            list(map(str, argv)), env=env, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str) -> re.Match[str]:
        """The first new stderr line matching ``pattern``; fails if the command ends first."""
        while True:
            try:
                line = self._queue.get(timeout=TIMEOUT)
            except queue.Empty:
                pytest.fail(f"no line matching {pattern!r} in {TIMEOUT} s: {self.lines}")
            if line is None:
                pytest.fail(f"the command ended (exit {self.proc.wait()}) before {pattern!r}: {self.lines}")
            if match := re.search(pattern, line):
                return match

    def finish(self) -> int:
        """Wait for the command to end by itself; its exit status."""
        code = self.proc.wait(TIMEOUT)
        self._reader.join(TIMEOUT)
        return code

    def stop(self) -> int:
        """Ask the command to end (SIGTERM) if it still runs; its exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.finish()

    def kill(self) -> None:
        """End the command at once if it still runs (cleanup after a test)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.finish()
