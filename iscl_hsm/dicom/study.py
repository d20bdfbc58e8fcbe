"""Synthetic DICOM studies for the demo, the tests and the benchmarks (pydicom only, no numpy).

The pixel data is a deterministic ramp, so two runs with the same arguments differ only in their UIDs
and a stored copy can be compared byte for byte with what was sent.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


@dataclass(frozen=True)
class StudySpec:
    """What to generate: ``images`` CT slices of ``rows`` x ``columns`` 16-bit pixels."""

    images: int = 4
    rows: int = 128
    columns: int = 128
    patient_name: str = "Demo^Phantom"
    patient_id: str = "ISCL-DEMO"

    @property
    def pixel_bytes(self) -> int:
        return self.rows * self.columns * 2

    @classmethod
    def of_size(cls, total_bytes: int, image_bytes: int = 2 * 1024 * 1024) -> StudySpec:
        """About ``total_bytes`` of pixel data in square images of about ``image_bytes`` each."""
        side = max(8, int((image_bytes // 2) ** 0.5))
        images = max(1, round(total_bytes / (side * side * 2)))
        return cls(images=images, rows=side, columns=side)


def ct_image(spec: StudySpec, study_uid: str, series_uid: str, number: int) -> Dataset:
    """One CT slice as a Part 10 dataset (file meta included), ready for ``save_as``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.Modality = "CT"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = number
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    ramp = bytes((number + i) % 256 for i in range(256))
    ds.PixelData = (ramp * (spec.pixel_bytes // 256 + 1))[: spec.pixel_bytes]
    return ds


def study(spec: StudySpec) -> list[Dataset]:
    """The slices of one new study (one series)."""
    study_uid, series_uid = generate_uid(), generate_uid()
    return [ct_image(spec, study_uid, series_uid, n) for n in range(1, spec.images + 1)]


def part10_bytes(ds: Dataset) -> bytes:
    """The dataset as a DICOM Part 10 file in memory."""
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def write_study(folder: Path, spec: StudySpec) -> list[Path]:
    """Write a new study into ``folder`` (created if needed) as ``IMG0001.dcm``...; return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in study(spec):
        path = folder / f"IMG{ds.InstanceNumber:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


_LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def dataset_bytes(part10: bytes) -> bytes:
    """The encoded dataset of a Part 10 file, without preamble and file meta: what travels in a C-STORE.

    Two copies of an object are the same object, in the same transfer syntax, when these bytes are
    equal, whatever their file meta says about the application that wrote them.
    """
    if part10[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no DICM prefix)")
    offset = 132
    while int.from_bytes(part10[offset : offset + 2], "little") == 0x0002:  # explicit VR little endian
        vr = part10[offset + 4 : offset + 6]
        if vr in _LONG_LENGTH_VRS:
            offset += 12 + int.from_bytes(part10[offset + 8 : offset + 12], "little")
        else:
            offset += 8 + int.from_bytes(part10[offset + 6 : offset + 8], "little")
    return part10[offset:]
