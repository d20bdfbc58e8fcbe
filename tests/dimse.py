"""DIMSE messages as the P-DATA-TF PDUs a pynetdicom association writes, for tests that need real ones."""

from __future__ import annotations

from io import BytesIO

from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu import P_DATA_TF

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DATA_SET = bytes.fromhex("10001000 06000000") + b"DOE^J "
"""(0010,0010) PatientName in implicit VR little endian."""


def _encode(message: C_ECHO_RQ | C_STORE_RQ | C_STORE_RSP, primitive: C_ECHO | C_STORE, max_pdu: int) -> list[bytes]:
    message.primitive_to_message(primitive)
    encoded = []
    for p_data in message.encode_msg(1, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        encoded.append(pdu.encode())
    return encoded


def store_request(data_set: bytes = DATA_SET * 2000, max_pdu: int = 16384) -> list[bytes]:
    """A C-STORE request: its command PDU, then the PDUs of its data set."""
    primitive = C_STORE()
    primitive.MessageID, primitive.Priority = 7, 2
    primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID = CT_IMAGE_STORAGE, "1.2.3.4.5"
    primitive.DataSet = BytesIO(data_set)
    return _encode(C_STORE_RQ(), primitive, max_pdu)


def store_response() -> bytes:
    """A successful C-STORE response (a command without a data set)."""
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo, primitive.Status = 7, 0x0000
    primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID = CT_IMAGE_STORAGE, "1.2.3.4.5"
    return _encode(C_STORE_RSP(), primitive, 16384)[0]


def echo_request() -> bytes:
    """A C-ECHO request (a command without a data set)."""
    primitive = C_ECHO()
    primitive.MessageID, primitive.AffectedSOPClassUID = 1, "1.2.840.10008.1.1"
    return _encode(C_ECHO_RQ(), primitive, 16384)[0]
