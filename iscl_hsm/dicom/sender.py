"""The storage SCU's side: find DICOM files, build presentation contexts from them, send each over ISCL.

Each file goes in its own transfer syntax: the association proposes one context per (SOP class,
transfer syntax) pair found, so no object is converted on the way. Files that are not DICOM Part 10
files, cannot be read, or whose data set is not whole or not the object their file meta names
(checks.check_data_set) are reported and skipped, never sent: a peer would store them as they are.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.status import code_to_category

from ..engine import Config
from ..keyholder.base import KeyHolder
from ..transport.common import DEFAULT_TIMEOUTS, Timeouts
from .association import associate, link_of
from .checks import Unfit, check_data_set

MAX_CONTEXTS = 128
"""Presentation contexts one association may propose (PS3.8: context ids 1..255, odd)."""


@dataclass(frozen=True)
class DicomFile:
    """A Part 10 file found on disk, as far as its file meta tells."""

    path: Path
    size: int
    sop_class: UID
    transfer_syntax: UID


@dataclass(frozen=True)
class Skipped:
    """A file that was not sent: not a readable DICOM Part 10 file, or not one fit to store."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Sent:
    """What became of one file: the peer's C-STORE status, or why there is none."""

    file: DicomFile
    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Stored (success, or a warning such as coercion of data elements)."""
        return self.status is not None and code_to_category(self.status) in ("Success", "Warning")

    def describe(self) -> str:
        if self.error is not None:
            return self.error
        assert self.status is not None
        return f"status 0x{self.status:04X} ({code_to_category(self.status)})"


def find_files(paths: Iterable[Path]) -> tuple[list[DicomFile], list[Skipped]]:
    """Every file under ``paths`` (folders recursively, in name order): those fit to send, and the others.

    Each file is read whole, once here and once more when it is sent.
    """
    found: list[DicomFile] = []
    skipped: list[Skipped] = []
    for path in _walk(paths):
        try:
            found.append(_examine(path))
        except OSError as exc:
            skipped.append(Skipped(path, f"cannot read it: {exc.strerror or exc}"))
        except InvalidDicomError:
            skipped.append(Skipped(path, "not a DICOM Part 10 file"))
        except Unfit as exc:
            skipped.append(Skipped(path, f"{exc}; repair or replace the file"))
    return found, skipped


def _examine(path: Path) -> DicomFile:
    """The file as it will be sent, once its file meta and its whole data set have been checked."""
    meta, offset = split_dataset(path)
    missing = [k for k in ("MediaStorageSOPClassUID", "TransferSyntaxUID") if k not in meta]
    if missing:
        raise Unfit(f"its file meta lacks {', '.join(missing)}")
    with path.open("rb") as file:
        file.seek(offset)
        data = file.read()
    sop_class, syntax = UID(meta.MediaStorageSOPClassUID), UID(meta.TransferSyntaxUID)
    check_data_set(data, syntax, sop_class=sop_class, sop_instance=meta.get("MediaStorageSOPInstanceUID"),
                   claimed_by="its file meta")  # fmt: skip
    return DicomFile(path, offset + len(data), sop_class, syntax)


def _walk(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            for folder, dirs, names in os.walk(path):
                dirs.sort()
                yield from (Path(folder) / name for name in sorted(names))
        else:
            yield path


def context_batches(files: list[DicomFile]) -> list[tuple[list[PresentationContext], list[DicomFile]]]:
    """Files grouped so that each association proposes at most MAX_CONTEXTS (SOP class, syntax) pairs."""
    pairs = sorted({(f.sop_class, f.transfer_syntax) for f in files})
    batches = []
    for start in range(0, len(pairs), MAX_CONTEXTS):
        chosen = set(pairs[start : start + MAX_CONTEXTS])
        contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in sorted(chosen)]
        batches.append((contexts, [f for f in files if (f.sop_class, f.transfer_syntax) in chosen]))
    return batches


def store_files(
    ae: ApplicationEntity,
    host: str,
    port: int,
    files: list[DicomFile],
    *,
    key_holder: KeyHolder,
    config: Config | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    called_ae: str = "ANY-SCP",
    on_sent: Callable[[Sent], None] = lambda sent: None,
) -> list[Sent]:
    """C-STORE each file over ISCL (one association per batch of contexts); ``on_sent`` after each.

    Raises :class:`~iscl_hsm.errors.IsclError` if a link or an association cannot be set up. If an
    association breaks, the files not yet answered are reported as failed and the rest is not sent.
    """
    results: list[Sent] = []

    def record(sent: Sent) -> None:
        results.append(sent)
        on_sent(sent)

    batches = context_batches(files)
    for number, (contexts, batch) in enumerate(batches):
        assoc = associate(
            ae, host, port, key_holder=key_holder, config=config, timeouts=timeouts,
            contexts=contexts, ae_title=called_ae,
        )  # fmt: skip
        pending = list(batch)
        while pending and assoc.is_established:
            record(_send_one(assoc, pending.pop(0)))
        if assoc.is_established:
            assoc.release()
            continue
        for rest in [*pending, *(f for _, later in batches[number + 1 :] for f in later)]:
            record(Sent(rest, None, "not sent: the association was aborted"))
        break
    return results


def _send_one(assoc: Association, file: DicomFile) -> Sent:
    try:
        dataset = dcmread(file.path)
    except (OSError, InvalidDicomError, ValueError) as exc:
        return Sent(file, None, f"cannot read it: {getattr(exc, 'strerror', None) or exc}")
    try:
        answer = assoc.send_c_store(dataset)
    except ValueError as exc:  # pynetdicom found no accepted context, or could not encode the data set
        return Sent(file, None, f"not sent: {exc}")
    except RuntimeError:  # the association ended before the request went out
        return _aborted(assoc, file)
    if "Status" not in answer:
        return _aborted(assoc, file)
    return Sent(file, int(answer.Status))


def _aborted(assoc: Association, file: DicomFile) -> Sent:
    """No answer: the association is gone (pynetdicom may not know yet, so make sure it ends now)."""
    assoc.abort()
    bridge = link_of(assoc)
    why = f": {bridge.error}" if bridge is not None and bridge.error is not None else ""
    return Sent(file, None, f"no answer, the association was aborted{why}")


__all__ = ["MAX_CONTEXTS", "DicomFile", "Sent", "Skipped", "context_batches", "find_files", "store_files"]
