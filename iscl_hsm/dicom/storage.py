"""The storage SCP's side: every received object becomes ``SOPInstanceUID.dcm`` in one folder, durably.

Each object is first checked (checks.check_data_set): a data set that is not whole, cannot be read,
or is not the object the request names answers a failure status and is not written, so a damaged
copy never replaces a good one. It is then written to a temporary file in the folder, fsynced and
renamed before the SCP answers success, so a success status means the file is complete on disk under
its final name; a file that could not be written answers a failure status and leaves no partial file
behind (and any earlier copy as it was).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import cast

from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.ae import ApplicationEntity
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from ..errors import ErrorCode, IsclError
from .association import MAXIMUM_PDU_SIZE
from .checks import CANNOT_UNDERSTAND, DOES_NOT_MATCH_SOP_CLASS, Unfit, check_data_set

LOGGER = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
"""C-STORE status "Refused: Out of Resources": the object could not be written."""

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
Notify = Callable[[str, bool], None]
"""``notify(line, ok)``: one line per object stored (ok) or refused (not ok)."""


def _log(line: str, ok: bool) -> None:
    LOGGER.log(logging.INFO if ok else logging.ERROR, "%s", line)


class OutputFolderError(IsclError):
    """The output folder cannot take files: found at start-up, before any association."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BAD_OPTION, message)


class StorageFolder:
    """Stores C-STORE requests into ``folder``; bind :meth:`handle_store` to ``evt.EVT_C_STORE``.

    ``notify(line, ok)`` gets one line per object stored or refused (default: logged, refusals as
    errors).
    """

    def __init__(self, folder: Path, notify: Notify = _log) -> None:
        self.folder = folder
        self._notify = notify
        check_writable(folder)

    @property
    def evt_handlers(self) -> list[tuple[evt.EventType, Callable[[Event], int]]]:
        return [(evt.EVT_C_STORE, self.handle_store)]

    def handle_store(self, event: Event) -> int:
        """Check the object, then write it as received (a Part 10 file in its syntax); answer the status."""
        request = cast(C_STORE, event.request)
        uid = str(request.AffectedSOPInstanceUID)
        peer = event.assoc.requestor.ae_title
        if not _UID.fullmatch(uid) or len(uid) > 64:
            self._notify(f"refused an object from {peer}: its SOP Instance UID {uid!r} is not a UID", False)
            return CANNOT_UNDERSTAND
        try:
            check_data_set(event.encoded_dataset(include_meta=False), event.context.transfer_syntax,
                           sop_class=str(request.AffectedSOPClassUID), sop_instance=uid,
                           claimed_by="the C-STORE request")  # fmt: skip
        except Unfit as exc:
            self._notify(f"refused {uid} from {peer}: {exc} (answered 0x{exc.status:04X})", False)
            return exc.status
        target = self.folder / f"{uid}.dcm"
        data = event.encoded_dataset()
        try:
            write_durably(target, data)
        except OSError as exc:
            self._notify(f"FAILED to store {target} from {peer}: {exc.strerror or exc} (answered 0xA700)", False)
            return OUT_OF_RESOURCES
        self._notify(f"stored {target} ({len(data)} bytes) from {peer}", True)
        return SUCCESS


def check_writable(folder: Path) -> None:
    """Raise :class:`OutputFolderError` unless a file can be created in ``folder``."""
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise OutputFolderError(f"the output folder {folder} {what}: create it or choose another with --output")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OutputFolderError(
            f"cannot create files in the output folder {folder}: {exc.strerror or exc}; choose another with --output"
        ) from None


def write_durably(target: Path, data: bytes) -> None:
    """Write ``target`` through a temporary file in the same folder: fsync, rename, fsync the folder."""
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    if not hasattr(os, "O_DIRECTORY"):  # Windows opens no folder to fsync; NTFS journals the rename
        return
    folder_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder_fd)
    finally:
        os.close(folder_fd)


def storage_ae(ae_title: str = "ISCL-SCP") -> ApplicationEntity:
    """An AE that accepts Verification and every storage SOP class pynetdicom knows, in any transfer syntax."""
    ae = ApplicationEntity(ae_title=ae_title)
    ae.maximum_pdu_size = MAXIMUM_PDU_SIZE
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    return ae


__all__ = ["CANNOT_UNDERSTAND", "DOES_NOT_MATCH_SOP_CLASS", "OUT_OF_RESOURCES", "SUCCESS", "OutputFolderError",
           "StorageFolder", "check_writable", "storage_ae", "write_durably"]
