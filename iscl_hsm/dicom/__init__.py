"""DICOM over ISCL: synthetic studies, the gateway, pynetdicom glue and the storage SCP.

The pynetdicom glue (see docs/dicom.md)::

    assoc = iscl_hsm.dicom.associate(ae, host, port, key_holder=holder, config=config)
    server = iscl_hsm.dicom.start_scp(ae, ("0.0.0.0", 2761), key_holder=holder, evt_handlers=handlers)
"""

from .association import MAXIMUM_PDU_SIZE, AssociationRefusedError, associate, link_of, start_scp
from .bridge import IsclBridge
from .sender import DicomFile, Sent, Skipped, find_files, store_files
from .storage import OutputFolderError, StorageFolder, storage_ae

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
