"""DICOM over ISCL: synthetic studies, the gateway, pynetdicom glue and the storage SCP.

The pynetdicom glue (see docs/dicom.md)::

    assoc = iscl_hsm.dicom.associate(ae, host, port, key_holder=holder, config=config)
    server = iscl_hsm.dicom.start_scp(ae, ("0.0.0.0", 2761), key_holder=holder, evt_handlers=handlers)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .association import MAXIMUM_PDU_SIZE, AssociationRefusedError, associate, link_of, start_scp
    from .bridge import IsclBridge
    from .sender import DicomFile, Sent, Skipped, find_files, store_files
    from .storage import OutputFolderError, StorageFolder, storage_ae

_HOMES = {
    "association": ("MAXIMUM_PDU_SIZE", "AssociationRefusedError", "associate", "link_of", "start_scp"),
    "bridge": ("IsclBridge",),
    "sender": ("DicomFile", "Sent", "Skipped", "find_files", "store_files"),
    "storage": ("OutputFolderError", "StorageFolder", "storage_ae"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    """Import the pynetdicom glue on first use: the gateway (iscl_hsm.dicom.gateway) relays bytes and
    needs neither pynetdicom nor pydicom, which take half a second to import."""
    if name not in _HOME_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME_OF[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "MAXIMUM_PDU_SIZE",
    "AssociationRefusedError",
    "DicomFile",
    "IsclBridge",
    "OutputFolderError",
    "Sent",
    "Skipped",
    "StorageFolder",
    "associate",
    "find_files",
    "link_of",
    "start_scp",
    "storage_ae",
    "store_files",
]
