"""The storage SCP's disk fills: `iscl serve` writing into a 1 MiB tmpfs.

The tmpfs is mounted in a mount namespace of the SCP's own (``unshare -m``, as root: what CI runs
as), so nothing outside the test sees it; the test reads it through /proc/PID/root. An object larger
than the space left answers 0xA700 (Refused: out of resources) and leaves nothing behind, not even
its temporary file; the good copy of that object stored earlier stays as it was; the objects around
it on the same association are stored whole; `iscl store` reports the failure for that file alone
and exits 1.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread

from iscl_hsm.dicom.storage import OUT_OF_RESOURCES
from iscl_hsm.dicom.study import StudySpec, write_study
from iscl_hsm.engine import Profile

from ..conftest import Hospitals
from ..dicom.conftest import assert_stored_exactly, python_iscl, stored_copy
from ..dicom.test_commands import profile_args
from ..test_cli import child_env, iscl, token_args
from .conftest import Background

DISK = 1 << 20
"""The tmpfs's size in bytes: room for a few small objects, not for a large one."""
SMALL = StudySpec(images=3, rows=256, columns=256)
"""128 KiB images: three fit, with room to spare."""
LARGE_SIDE = 768
"""A 768 x 768 16-bit image: 1.1 MiB, more than the whole disk."""


@dataclass
class SmallDiskScp:
    """`iscl serve` storing into ``output``, a tmpfs in its own mount namespace; ``stored`` is that folder as
    this process sees it (through /proc/PID/root)."""

    serve: Background
    port: int
    output: Path
    stored: Path


@pytest.fixture
def small_disk_scp(hospitals: Hospitals, tmp_path: Path, profile: Profile) -> Iterator[SmallDiskScp]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.fail("the full-disk test mounts a tmpfs in a mount namespace of its own: it needs root and unshare")
    output = tmp_path / "stored"
    output.mkdir()
    serve = Background(
        ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o "size=$1" tmpfs "$2" && shift 2 && exec "$@"', "sh", str(DISK),
         output, *python_iscl("serve", "--output", output, "--listen", "127.0.0.1:0",
                              *token_args(hospitals, hospitals.a), *profile_args(profile))],
        child_env(hospitals),
    )  # fmt: skip
    try:
        port = int(serve.wait_for(rf"^iscl serve: listening on 127\.0\.0\.1:(\d+), storing into {output}$").group(1))
        stored = Path(f"/proc/{serve.proc.pid}/root") / output.relative_to("/")
        disk = os.statvfs(stored)
        assert disk.f_blocks * disk.f_frsize == DISK, "the SCP does not store into its own small tmpfs"
        yield SmallDiskScp(serve, port, output, stored)
    finally:
        serve.kill()


def larger_version(path: Path, target: Path) -> Path:
    """The object of ``path`` sent again with a larger image (the same SOP Instance UID), too big for the disk."""
    ds = dcmread(path)
    ds.Rows = ds.Columns = LARGE_SIDE
    ds.PixelData = os.urandom(LARGE_SIDE * LARGE_SIDE * 2)
    ds.save_as(target, enforce_file_format=True)
    return target


def test_a_full_disk_refuses_the_object_that_does_not_fit_and_keeps_everything_else(
    hospitals: Hospitals, small_disk_scp: SmallDiskScp, tmp_path: Path, profile: Profile
) -> None:
    scp, client = small_disk_scp, [*token_args(hospitals, hospitals.b), *profile_args(profile)]
    earlier, *later = write_study(tmp_path / "study", SMALL)
    first = iscl("store", "127.0.0.1", scp.port, earlier, *client, env=child_env(hospitals))
    assert first.returncode == 0, first.stderr
    assert_stored_exactly(scp.stored, [earlier])
    good_copy = stored_copy(scp.stored, earlier).read_bytes()
    batch = tmp_path / "batch"
    batch.mkdir()
    sent = [later[0].rename(batch / "1-fits.dcm"), larger_version(earlier, batch / "2-too-large.dcm"),
            later[1].rename(batch / "3-fits.dcm")]  # fmt: skip

    store = iscl("store", "127.0.0.1", scp.port, batch, *client, env=child_env(hospitals))

    assert store.returncode == 1
    assert "Traceback" not in store.stderr
    failure, summary = store.stderr.splitlines()
    assert failure == f"iscl store: {sent[1]}: status 0x{OUT_OF_RESOURCES:04X} (Failure)"
    assert summary.startswith("iscl store: stored 2 of 3 files (") and summary.endswith("; 1 failed, 0 skipped")
    refused = scp.serve.wait_for(r"^iscl serve: FAILED to store ").string
    assert refused == (
        f"iscl serve: FAILED to store {scp.output}/{dcmread(earlier).SOPInstanceUID}.dcm from ISCL-SCU: No space"
        " left on device (answered 0xA700)"
    )
    # The objects before and after it on the same association are stored whole, the good copy of the
    # refused object is as it was, and no temporary file is left.
    assert_stored_exactly(scp.stored, [earlier, sent[0], sent[2]])
    assert stored_copy(scp.stored, earlier).read_bytes() == good_copy
    assert list(scp.output.iterdir()) == []  # outside the SCP's namespace the folder stays empty
    assert scp.serve.stop() == 0
