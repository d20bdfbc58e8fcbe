"""Is a data set whole and the object it claims to be? What `iscl store` checks before it sends a file
and `iscl serve` before it stores an object.

pydicom reads damaged data sets without complaint: it stops silently at a cut inside an element
header, keeps a value cut short as a shorter value, and drops an undefined-length element that has
no delimiter with only a warning. A truncated file therefore reads as a shorter data set that looks
valid, and an SCP stores it in place of a good copy. So every element header and length is walked
here first, then pydicom converts every value, and native Pixel Data is measured against the image
its attributes describe.
"""

from __future__ import annotations

import struct
import zlib
from io import BytesIO

from pydicom.datadict import dictionary_description
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

DOES_NOT_MATCH_SOP_CLASS = 0xA900
"""C-STORE status "Error: Data Set does not match SOP Class": here, SOP UIDs missing or not those claimed."""
CANNOT_UNDERSTAND = 0xC000
"""C-STORE status "Error: Cannot understand": here, a data set that is not whole or cannot be read."""

_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010


class Unfit(ValueError):
    """Why a data set must be neither sent nor stored; ``status`` is the failure an SCP answers."""

    def __init__(self, reason: str, status: int = CANNOT_UNDERSTAND) -> None:
        super().__init__(reason)
        self.status = status


def check_data_set(
    data: bytes, syntax: UID, *, sop_class: str, sop_instance: str | None, claimed_by: str
) -> None:
    """Raise :class:`Unfit` unless ``data``, a data set encoded in ``syntax``, is whole, every value
    reads, native Pixel Data holds the whole image, and its SOP UIDs are those ``claimed_by`` gives."""
    if not syntax.is_transfer_syntax:
        raise Unfit(f"its transfer syntax {syntax} is not one pydicom knows, so it cannot be encoded")
    if syntax.is_deflated:
        try:
            data = zlib.decompress(data, -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise Unfit(f"its deflated data set does not inflate: {exc}") from None
    _Walk(data, syntax).data_set(0, len(data), syntax.is_implicit_VR, in_item=False)
    dataset = read_dataset(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian)
    _read_every_value(dataset)
    _check_sop_uids(dataset, sop_class, sop_instance, claimed_by)
    if not syntax.is_encapsulated:
        _check_pixel_data(dataset)


class _Walk:
    """Every element and item header of an encoded data set, checked against the bytes that are there."""

    def __init__(self, data: bytes, syntax: UID) -> None:
        self.data = data
        self.syntax = syntax
        self.u16 = struct.Struct("<H" if syntax.is_little_endian else ">H").unpack_from
        self.u32 = struct.Struct("<L" if syntax.is_little_endian else ">L").unpack_from

    def data_set(self, pos: int, end: int, implicit: bool, in_item: bool) -> int:
        """Walk the elements from ``pos`` to ``end``, or to the item delimiter when ``in_item``."""
        while pos < end:
            tag, vr, length, pos = self.header(pos, end, implicit)
            if tag == _ITEM_END and in_item:
                return pos
            if length != _UNDEFINED:
                pos = self.skip(pos, length, end, _name(tag))
            elif tag == _PIXEL_DATA:
                pos = self.items(pos, end, _name(tag), implicit=None)
            else:  # a sequence; one whose VR is UN holds implicit VR little endian items (PS3.5 6.2.2)
                pos = self.items(pos, end, _name(tag), implicit=implicit or vr == b"UN")
        if in_item:
            raise Unfit("its data set ends inside a sequence item, before the item's delimiter")
        return pos

    def items(self, pos: int, end: int, owner: str, implicit: bool | None) -> int:
        """Walk the items of an undefined-length value up to its sequence delimiter (``implicit`` is
        None for Pixel Data, whose items are fragments, not data sets)."""
        while True:
            tag, _, length, pos = self.header(pos, end, implicit=True)
            if tag == _SEQUENCE_END:
                return pos
            if tag != _ITEM:
                raise Unfit(f"{owner} has an undefined length, but what follows is not an item")
            if length != _UNDEFINED:
                pos = self.skip(pos, length, end, f"an item of {owner}")
            elif implicit is None:
                raise Unfit(f"a fragment of {owner} has an undefined length")
            else:
                pos = self.data_set(pos, end, implicit, in_item=True)

    def header(self, pos: int, end: int, implicit: bool) -> tuple[int, bytes, int, int]:
        """The tag, VR (b"" when implicit), value length and value position of the element at ``pos``."""
        self.skip(pos, 8, end, f"the header of the element at byte {pos}")
        tag = self.u16(self.data, pos)[0] << 16 | self.u16(self.data, pos + 2)[0]
        if implicit or tag >> 16 == 0xFFFE:  # item and delimiter headers never have a VR
            return tag, b"", self.u32(self.data, pos + 4)[0], pos + 8
        vr = self.data[pos + 4 : pos + 6]
        if not (vr.isalpha() and vr.isupper()):
            raise Unfit(f"{_name(tag)} has no valid VR: is the data set really in {self.syntax.name}?")
        if vr.decode() in EXPLICIT_VR_LENGTH_32:
            self.skip(pos, 12, end, f"the header of {_name(tag)}")
            return tag, vr, self.u32(self.data, pos + 8)[0], pos + 12
        return tag, vr, self.u16(self.data, pos + 6)[0], pos + 8

    def skip(self, pos: int, length: int, end: int, what: str) -> int:
        """The position after ``length`` bytes of ``what`` at ``pos``, if they are all there."""
        if pos + length <= end:
            return pos + length
        if end == len(self.data):
            missing = pos + length - end
            raise Unfit(f"its data set ends inside {what}: {missing} of its {length} bytes are missing")
        raise Unfit(f"{what} runs past the end of the item that holds it")


def _name(tag: int) -> str:
    try:
        return f"{Tag(tag)} {dictionary_description(tag)}"
    except KeyError:  # a private or unknown tag
        return str(Tag(tag))


def _read_every_value(dataset: Dataset) -> None:
    """Have pydicom convert every element, in sequences too, so that a value it cannot read shows here."""
    for tag in list(dataset.keys()):  # not `in dataset`, which would convert before the try
        try:
            element = dataset[tag]
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on a bad value
            raise Unfit(f"its {_name(tag)} cannot be read: {exc}") from None
        if element.VR == "SQ":
            for item in element.value:
                _read_every_value(item)


def _check_sop_uids(dataset: Dataset, sop_class: str, sop_instance: str | None, claimed_by: str) -> None:
    missing = [keyword for keyword in ("SOPClassUID", "SOPInstanceUID") if not dataset.get(keyword)]
    if missing:
        raise Unfit(f"its data set lacks {' and '.join(missing)}, which every stored object needs",
                    DOES_NOT_MATCH_SOP_CLASS)  # fmt: skip
    for keyword, claimed in (("SOPClassUID", sop_class), ("SOPInstanceUID", sop_instance)):
        if claimed is not None and dataset[keyword].value != claimed:
            raise Unfit(f"its {keyword} {dataset[keyword].value} is not the {claimed} of {claimed_by}",
                        DOES_NOT_MATCH_SOP_CLASS)  # fmt: skip


def _check_pixel_data(dataset: Dataset) -> None:
    """Native Pixel Data must hold the whole image its attributes describe: a cut file holds less."""
    rows, columns, bits = (dataset.get(k) for k in ("Rows", "Columns", "BitsAllocated"))
    if "PixelData" not in dataset or not (rows and columns and bits):
        return
    samples, frames = dataset.get("SamplesPerPixel") or 1, dataset.get("NumberOfFrames") or 1
    needed = (rows * columns * samples * int(frames) * bits + 7) // 8
    if len(dataset.PixelData) < needed:
        raise Unfit(
            f"its Pixel Data holds {len(dataset.PixelData)} bytes, but Rows x Columns x Samples per Pixel x"
            f" Number of Frames x Bits Allocated / 8 = {rows} x {columns} x {samples} x {frames} x {bits} / 8"
            f" needs {needed}"
        )


__all__ = ["CANNOT_UNDERSTAND", "DOES_NOT_MATCH_SOP_CLASS", "Unfit", "check_data_set"]
