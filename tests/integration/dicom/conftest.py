"""Helpers for the DICOM-over-ISCL tests: background commands, studies on disk, stored-copy checks."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.filereader import read_file_meta_info

from iscl_hsm.dicom.study import StudySpec, dataset_bytes, write_study

from ..background import Background

DCMTK = ("storescp", "storescu", "echoscu")


@pytest.fixture
def background() -> Iterator[list[Background]]:
    """Commands a test starts are appended here and stopped afterwards."""
    started: list[Background] = []
    yield started
    for command in started:
        command.kill()


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
