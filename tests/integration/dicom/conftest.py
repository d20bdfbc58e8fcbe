"""Helpers for the DICOM-over-ISCL tests: background commands, studies on disk, stored-copy checks."""

from __future__ import annotations

import queue
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from pydicom.filereader import read_file_meta_info

from iscl_hsm.dicom.study import StudySpec, dataset_bytes, write_study

from ..test_cli import TIMEOUT

DCMTK = ("storescp", "storescu", "echoscu")


class Background:
    """A command running in the background; its stderr is collected line by line."""

    def __init__(self, argv: Sequence[object], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            list(map(str, argv)), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
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

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(TIMEOUT)
        self._reader.join(TIMEOUT)
        return code


@pytest.fixture
def background() -> Iterator[list[Background]]:
    """Commands a test starts are appended here and stopped afterwards."""
    started: list[Background] = []
    yield started
    for command in started:
        if command.proc.poll() is None:
            command.proc.kill()
            command.proc.wait(TIMEOUT)


def dcmtk(tool: str) -> str:
    """The DCMTK tool's path; fails (never skips) when DCMTK is missing."""
    path = shutil.which(tool, path="/usr/bin:/usr/local/bin")
    if path is None:
        pytest.fail(f"DCMTK's {tool} is not installed: apt-get install dcmtk")
    return path


def make_study(folder: Path, images: int = 3) -> list[Path]:
    return write_study(folder, StudySpec(images=images, rows=64, columns=64))


def stored_copy(output: Path, sent: Path) -> Path:
    """Where the SCP stores ``sent``: OUTPUT/SOPInstanceUID.dcm."""
    return output / f"{read_file_meta_info(sent).MediaStorageSOPInstanceUID}.dcm"


def assert_stored_exactly(output: Path, sent: list[Path]) -> None:
    """OUTPUT holds one file per sent file and nothing else, each with the same dataset and transfer syntax."""
    assert sorted(p.name for p in output.iterdir()) == sorted(stored_copy(output, p).name for p in sent)
    for path in sent:
        copy = stored_copy(output, path)
        assert dataset_bytes(copy.read_bytes()) == dataset_bytes(path.read_bytes()), path
        assert read_file_meta_info(copy).TransferSyntaxUID == read_file_meta_info(path).TransferSyntaxUID


def python_iscl(*args: object) -> list[str]:
    """The argv of `iscl ARGS` in a child process."""
    return [sys.executable, "-m", "iscl_hsm", *map(str, args)]
