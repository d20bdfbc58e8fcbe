"""Backing up every key of a token that can leave it, and restoring them into another token.

A backup file (format "iscl-hsm key backup 1") holds one wrapped-key document per key version
(format 2 of :mod:`.store`, each bound to the transport key by :mod:`.binding`) with that version's
key record as the token holds it, whatever fields it has. The file as a whole is bound the same way,
so no entry can be dropped, added or swapped between backups. Non-extractable and host-readable keys
cannot leave the token and are listed as left out; transport keys are never backed up (a component
ceremony gives a new token its transport key, then the backup can be restored into it).

Restore checks the file's MAC and, for every entry, its MAC and the KCV of the key it unwraps, before
it installs the first key; then it installs every version (same versions, same records, exportable
again) or, if anything fails, none. Built on :class:`~iscl_hsm.keys.store.KeyStore`'s internals, as
part of the same package.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Final

from pkcs11 import exceptions as p11

from iscl_hsm.errors import ErrorCode, KeyHolderError
from iscl_hsm.keyholder.key_records import utc_text
from iscl_hsm.keys.binding import bind, check_binding_fields, verify
from iscl_hsm.keys.store import (
    KeyInfo,
    KeyStore,
    check_wrapped_fields,
    checked_unwrap,
    create_record,
    json_document,
    stored_template,
)

__all__ = ["BACKUP_FORMAT", "Backup", "backup", "parse_backup", "restore"]

BACKUP_FORMAT: Final = "iscl-hsm key backup 1"
_ANOTHER_COPY: Final = "use another copy of the backup, or make a new one from the original token"


@dataclass(frozen=True)
class Backup:
    """A bound backup document, the key versions in it, and those left out with the reason why."""

    document: dict[str, Any]
    saved: list[KeyInfo]
    left_out: list[tuple[KeyInfo, str]]


def backup(store: KeyStore, transport_index: int) -> Backup:
    """Wrap every key version of ``store`` that can leave it under transport key ``transport_index``."""
    with store.session("back up its keys") as session:
        transport, transport_info = store.transport_key(session, transport_index)
        records = store.records(session)
        entries, saved, left_out = [], [], []
        for info in store.infos(session):
            why = store.why_not_exportable(info)
            if why is not None:
                left_out.append((info, why))
                continue
            record = records.get((info.purpose, info.index, info.version), (None, None))[1] or {}
            entries.append(store.wrapped_document(session, info, transport, transport_info, record=record))
            saved.append(info)
        if not entries:
            raise KeyHolderError(
                f"token '{store.token_label}' holds no key that can leave it (none was created"
                " --exportable, and transport keys never leave a token), so there is nothing to back up;"
                " create keys with --exportable to back them up, or keep the component forms of the keys"
                " to enter them again",
                ErrorCode.BAD_OPTION,
            )
        document = {
            "format": BACKUP_FORMAT,
            "source": {"token": store.token_label, "serial": store.serial},
            "made": utc_text(),
            "wrapping": entries[0]["wrapping"],
            "left_out": [
                {"label": i.label, "version": i.version, "kcv": i.kcv, "why": w} for i, w in left_out
            ],
            "keys": entries,
        }
        return Backup(bind(session, transport, document), saved, left_out)


def parse_backup(text: str, name: str) -> dict[str, Any]:
    """Read and check the fields of a backup document (not yet its MACs); ``name`` is the file."""
    corrupted = f"the backup file {name} is corrupted"
    document = json_document(text, corrupted, _ANOTHER_COPY)
    if not isinstance(document, dict) or document.get("format") != BACKUP_FORMAT:
        raise KeyHolderError(f"{name} is not a backup file of iscl keys backup", ErrorCode.BAD_OPTION)
    try:
        entries = document["keys"]
        names = {(e["purpose"], e["index"], e["version"]) for e in entries}
        ok = (
            isinstance(document["source"], dict)
            and isinstance(document["left_out"], list)
            and len(entries) == len(names) > 0
            and all(
                check_wrapped_fields(e)
                and isinstance(e["record"], dict)
                and e["wrapping"] == document["wrapping"]
                for e in entries
            )
            and check_binding_fields(document)
        )
    except (KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise KeyHolderError(
            f"{corrupted} (a field is missing or malformed); {_ANOTHER_COPY}", ErrorCode.BAD_KEY_FILE
        )
    return document


def _entry_name(entry: dict[str, Any]) -> str:
    return f"iscl-{entry['purpose']}-{entry['index']} version {entry['version']}"


def restore(store: KeyStore, document: dict[str, Any], *, replace: bool = False) -> list[KeyInfo]:
    """Install every key version of a backup (checked by :func:`parse_backup`): all of them, or none.

    Every version at an index the backup holds is destroyed first with ``replace``; without it, a
    token that holds any of those indexes is refused.
    """
    entries: list[dict[str, Any]] = document["keys"]
    with store.session("restore its keys") as session:
        transport, transport_info = store.wrapping_transport(session, document["wrapping"], "the backup")
        transport_name = f"{transport_info.label} (KCV {transport_info.kcv})"
        verify(transport, transport_name, document, "the backup was altered after it was made", _ANOTHER_COPY)
        unwraps = [
            checked_unwrap(
                transport,
                transport_info,
                entry,
                f"entry {number} of the backup ({_entry_name(entry)}) was altered after the backup was made",
                _ANOTHER_COPY,
            )
            for number, entry in enumerate(entries, 1)
        ]
        indexes = {(entry["purpose"], entry["index"]) for entry in entries}
        existing = [(p, i, v, o) for p, i, v, o in store.objects(session) if (p, i) in indexes]
        if existing and not replace:
            held = sorted({f"iscl-{p}-{i}" for p, i, _, _ in existing})
            raise KeyHolderError(
                f"token '{store.token_label}' already holds {', '.join(held)}, which the backup also holds;"
                " pass --replace to destroy every version of those keys here and restore the backup's,"
                " or restore into another token",
                ErrorCode.BAD_OPTION,
            )
        records = store.records(session)  # the old records, before new ones of the same versions exist
        created: list[Any] = []
        try:
            for entry, unwrap in zip(entries, unwraps, strict=True):
                purpose, index, version = entry["purpose"], entry["index"], entry["version"]
                created.append(unwrap(True, stored_template(purpose, index, version, exportable=True)))
                record = {**entry["record"], "purpose": purpose, "index": index, "version": version}
                created.append(create_record(session, {**record, "kcv": entry["kcv"]}))
        except BaseException:
            for leftover in reversed(created):
                with contextlib.suppress(p11.PKCS11Error):
                    leftover.destroy()
            raise
        for purpose, index, version, obj in existing:
            store.destroy_version(session, records, purpose, index, version, obj)
        restored = {(entry["purpose"], entry["index"], entry["version"]) for entry in entries}
        return [i for i in store.infos(session) if (i.purpose, i.index, i.version) in restored]
