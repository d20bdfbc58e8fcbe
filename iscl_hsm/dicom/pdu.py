"""Just enough of the DICOM upper layer (PS3.8 9.3) to tell that a command's data set is on its way.

The relay sends each read from an application as one ISCL message, and every message costs a
request/acceptance round trip. A storage SCU writes a C-STORE request as a command PDU and, a moment
later, the object's data set: read on its own, the command would cost each object a round trip of
its own while both tunnels wait. :func:`announces_data_set` lets the relay wait briefly for the data
set instead, and send the command with its first part as one message.
"""

from __future__ import annotations

import struct

P_DATA_TF = 0x04
"""PDU type of P-DATA-TF (PS3.8 9.3.5)."""

_PDU_HEAD = struct.Struct(">BBI")  # type, reserved (zero), length of what follows
_PDV_HEAD = struct.Struct(">IBB")  # item length (from the context id on), presentation context id, control header
_ELEMENT_HEAD = struct.Struct("<HHI")  # group, element, value length (implicit VR little endian)

_COMMAND_AND_LAST = 0x03
"""Message control header bits (PS3.8 E.2): bit 0 set = a command, bit 1 set = its last fragment."""

_COMMAND_DATA_SET_TYPE = (0x0000, 0x0800)
_NO_DATA_SET = 0x0101
"""CommandDataSetType value meaning that no data set follows (PS3.7 E.1)."""


def announces_data_set(data: bytes) -> bool:
    """True when ``data`` is whole P-DATA-TF PDUs, the last ending with a command that has a data set.

    Anything else (part of a PDU, a data set fragment, an association PDU, a command split over
    several fragments, bytes that are not DICOM) is False: the caller then simply sends what it has.
    The walk stops at the first header that is not a P-DATA-TF's, so bytes that are not PDUs (a
    read from the middle of a PDU, a tunnel carrying something else) cost a step, not a walk.
    """
    offset, start = 0, 0
    while offset < len(data):
        if offset + _PDU_HEAD.size > len(data):
            return False
        pdu_type, reserved, length = _PDU_HEAD.unpack_from(data, offset)
        if pdu_type != P_DATA_TF or reserved or length < _PDV_HEAD.size:
            return False
        start, offset = offset + _PDU_HEAD.size, offset + _PDU_HEAD.size + length
    if offset != len(data) or not start:
        return False
    return _last_pdv_announces_data_set(data, start, offset)


def _last_pdv_announces_data_set(data: bytes, start: int, end: int) -> bool:
    control, fragment = None, (0, 0)
    while start < end:
        if start + _PDV_HEAD.size > end:
            return False
        length, _context, control = _PDV_HEAD.unpack_from(data, start)
        if length < 2 or start + 4 + length > end:
            return False
        fragment = (start + _PDV_HEAD.size, start + 4 + length)
        start = fragment[1]
    if control is None or control & _COMMAND_AND_LAST != _COMMAND_AND_LAST:
        return False
    data_set_type = _command_data_set_type(data, *fragment)
    return data_set_type is not None and data_set_type != _NO_DATA_SET


def _command_data_set_type(data: bytes, start: int, end: int) -> int | None:
    """CommandDataSetType (0000,0800) of a fragment holding a whole command set, else None.

    A command set is implicit VR little endian and opens with CommandGroupLength (0000,0000), the
    length of the rest (PS3.7 6.3.1): a fragment that does not is part of a longer command.
    """
    if start + _ELEMENT_HEAD.size + 4 > end:
        return None
    group, element, length = _ELEMENT_HEAD.unpack_from(data, start)
    start += _ELEMENT_HEAD.size + 4
    if (group, element, length) != (0, 0, 4) or int.from_bytes(data[start - 4 : start], "little") != end - start:
        return None
    while start + _ELEMENT_HEAD.size <= end:
        group, element, length = _ELEMENT_HEAD.unpack_from(data, start)
        start += _ELEMENT_HEAD.size
        if (group, element) == _COMMAND_DATA_SET_TYPE:
            return int.from_bytes(data[start : start + 2], "little") if length == 2 and start + 2 <= end else None
        start += length
    return None


__all__ = ["P_DATA_TF", "announces_data_set"]
