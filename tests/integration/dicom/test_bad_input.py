"""Damaged DICOM input: `iscl store` skips it with the reason and sends the rest, `iscl serve` refuses it.

pydicom reads a file cut inside an element as a shorter data set that looks valid, so without the
checks of iscl_hsm.dicom.checks such a file would be stored in place of a good copy. Hospital A
serves, hospital B sends, in both wire profiles.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)
from pynetdicom import _config
from pynetdicom.dsutils import encode

from iscl_hsm.dicom import associate, find_files
from iscl_hsm.dicom.checks import CANNOT_UNDERSTAND, DOES_NOT_MATCH_SOP_CLASS
from iscl_hsm.engine import Config, Profile
from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder

from ..conftest import Hospitals
from ..test_cli import child_env, iscl, token_args
from .conftest import Background, assert_stored_exactly, make_study, stored_copy
from .test_commands import profile_args, start_serve
from .test_pynetdicom import scu

PIXEL_BYTES = 64 * 64 * 2
"""Pixel Data of make_study's images: 64 x 64 16-bit pixels."""
CUT = 1000
"""Bytes cut off the end of a file, all inside its Pixel Data."""
REPAIR = "; repair or replace the file"
ENDS_INSIDE_PIXELS = (
    f"its data set ends inside (7FE0,0010) Pixel Data: {CUT} of its {PIXEL_BYTES} bytes are missing"
)
NO_SOP_UIDS = "its data set lacks SOPClassUID and SOPInstanceUID, which every stored object needs"


def cut(path: Path, target: Path, length: int = CUT) -> Path:
    """A copy of ``path`` without its last ``length`` bytes, as a file truncated in transfer or on disk."""
    target.write_bytes(path.read_bytes()[:-length])
    return target


def without_sop_uids(path: Path, target: Path) -> Path:
    """A copy of ``path`` whose data set lacks SOPClassUID and SOPInstanceUID (its file meta keeps them)."""
    ds = dcmread(path)
    del ds.SOPClassUID, ds.SOPInstanceUID
    ds.save_as(target)
    return target


def with_unencapsulated_pixel_data(path: Path, target: Path) -> Path:
    """A copy of ``path`` whose native Pixel Data has an undefined length but holds pixels, not items.

    pydicom reads it and every value converts; pynetdicom cannot encode it (pydicom's writer refuses
    undefined-length Pixel Data that is not encapsulated).
    """
    data = path.read_bytes()
    pixels = data.index(b"\xe0\x7f\x10\x00OW")
    value = data[pixels + 12 :]
    undefined_length, sequence_end = b"\x00\x00\xff\xff\xff\xff", b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    target.write_bytes(data[:pixels] + b"\xe0\x7f\x10\x00OW" + undefined_length + value + sequence_end)
    return target


def in_a_private_syntax(path: Path, target: Path) -> Path:
    """A copy of ``path`` whose file meta names a transfer syntax no one knows: pydicom reads it, pynetdicom
    cannot tell how to encode it."""
    ds = dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.8.498.1"
    ds.save_as(target, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return target


def test_store_skips_each_damaged_file_with_its_reason_and_sends_the_rest(
    hospitals: Hospitals, background: list[Background], tmp_path: Path, profile: Profile
) -> None:
    """The damaged copy of an object already stored is skipped, so the stored good copy stays as it was."""
    output = tmp_path / "stored"
    output.mkdir()
    earlier = make_study(tmp_path / "earlier", images=3)
    shutil.copy(earlier[0], stored_copy(output, earlier[0]))  # stored by an earlier run
    folder = tmp_path / "in"
    good = make_study(folder, images=2)
    (folder / "notes.txt").write_text("not DICOM")
    unencodable = with_unencapsulated_pixel_data(earlier[2], folder / "unencodable.dcm")
    ds = dcmread(unencodable)
    assert [element.value for element in ds.iterall()] and len(ds.PixelData) == PIXEL_BYTES
    assert encode(ds, False, True) is None  # what pynetdicom's send_c_store would meet
    bad = [
        (cut(earlier[0], folder / "cut.dcm"), ENDS_INSIDE_PIXELS),
        (without_sop_uids(earlier[1], folder / "no-uids.dcm"), NO_SOP_UIDS),
        (folder / "notes.txt", "not a DICOM Part 10 file"),
        (in_a_private_syntax(earlier[1], folder / "private.dcm"),
         "its transfer syntax 1.2.826.0.1.3680043.8.498.1 is not one pydicom knows, so it cannot be encoded"),
        (unencodable, "(7FE0,0010) Pixel Data has an undefined length, but what follows is not an item"),
    ]  # fmt: skip
    _, port = start_serve(background, hospitals, output, *profile_args(profile))

    client = [*token_args(hospitals, hospitals.b), *profile_args(profile)]
    store = iscl("store", "127.0.0.1", port, folder, *client, env=child_env(hospitals))
    assert store.returncode == 1
    assert "Traceback" not in store.stderr
    *skips, summary = store.stderr.splitlines()
    expected = sorted((path, reason + ("" if path.suffix == ".txt" else REPAIR)) for path, reason in bad)
    assert skips == [f"iscl store: skipped {path}: {reason}" for path, reason in expected]
    assert summary.startswith("iscl store: stored 2 of 2 files (")
    assert summary.endswith("; 0 failed, 5 skipped")
    assert_stored_exactly(output, [*good, earlier[0]])


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit])
def test_a_file_cut_short_is_skipped_in_every_kind_of_transfer_syntax(tmp_path: Path, syntax: str) -> None:
    """Implicit VR, deflated, encapsulated: a cut inside the last element or its delimiter is found; the
    whole file passes."""
    whole = make_study(tmp_path / "in", images=1)[0]
    ds = dcmread(whole)
    if syntax == JPEGBaseline8Bit:  # fragments of made-up JPEG data: only the encapsulation is checked
        ds.PixelData = encapsulate([b"\xff\xd8" + bytes(998), b"\xff\xd9" + bytes(500)])
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(whole, enforce_file_format=True)
    for length in (2, 7, 9, 300):
        cut(whole, tmp_path / "in" / f"cut{length}.dcm", length)
    files, skipped = find_files([tmp_path / "in"])
    assert [f.path for f in files] == [whole]
    assert [s.path.name for s in skipped] == ["cut2.dcm", "cut300.dcm", "cut7.dcm", "cut9.dcm"]
    deflated = syntax == DeflatedExplicitVRLittleEndian
    expected = "its deflated data set does not inflate: " if deflated else "its data set ends inside "
    assert all(s.reason.startswith(expected) and s.reason.endswith(REPAIR) for s in skipped), skipped


def test_serve_refuses_a_damaged_data_set_and_keeps_the_good_copy(
    hospitals: Hospitals, holders: Callable[..., Pkcs11KeyHolder], background: list[Background],
    tmp_path: Path, profile: Profile, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """pynetdicom sends what `iscl store` would skip: the raw bytes of a file cut inside its Pixel Data (a
    chunked send copies the file), that file as pydicom reads it (a shorter Pixel Data, consistently encoded),
    and a data set without SOP UIDs. Each is an object `iscl serve` already holds."""
    output = tmp_path / "stored"
    output.mkdir()
    good = make_study(tmp_path / "good", images=1)[0]
    shutil.copy(good, stored_copy(output, good))
    truncated = cut(good, tmp_path / "cut.dcm")
    uid = dcmread(good).SOPInstanceUID
    serve, port = start_serve(background, hospitals, output, *profile_args(profile))
    ae = scu()
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = associate(ae, "127.0.0.1", port, key_holder=holders(hospitals.b), config=Config(profile=profile),
                      ae_title="ISCL-SCP")  # fmt: skip

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    assert assoc.send_c_store(truncated).Status == CANNOT_UNDERSTAND
    no_uids = without_sop_uids(good, tmp_path / "no-uids.dcm")
    assert assoc.send_c_store(no_uids).Status == DOES_NOT_MATCH_SOP_CLASS
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", False)
    assert assoc.send_c_store(dcmread(truncated)).Status == CANNOT_UNDERSTAND
    assoc.release()

    refused = f"^iscl serve: refused {uid} from HOSPITAL-B: "
    assert serve.wait_for(refused).string.endswith(f"{ENDS_INSIDE_PIXELS} (answered 0xC000)")
    assert serve.wait_for(refused).string.endswith(f"{NO_SOP_UIDS} (answered 0xA900)")
    assert serve.wait_for(refused).string.endswith(
        f"its Pixel Data holds {PIXEL_BYTES - CUT} bytes, but Rows x Columns x Samples per Pixel x Number of"
        f" Frames x Bits Allocated / 8 = 64 x 64 x 1 x 1 x 16 / 8 needs {PIXEL_BYTES} (answered 0xC000)"
    )
    assert_stored_exactly(output, [good])  # byte for byte the good copy, and no temporary file left
    assert serve.stop() == 0
    assert not any("Traceback" in line for line in serve.lines)
