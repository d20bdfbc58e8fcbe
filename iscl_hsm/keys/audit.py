"""The key-management audit log: one JSON object per line, each line chained to the one before.

Every line carries ``seq`` (1, 2, ...), ``prev`` (the previous line's ``hash``; 64 zeros for the
first) and ``hash`` = SHA-256 over ``prev`` and the line's canonical JSON without ``hash`` (keys
sorted, no spaces, UTF-8). :func:`verify` recomputes the chain and names the first line that was
edited (its hash does not match its content), removed (a gap in ``seq``) or moved (``seq`` goes
back, or ``prev`` names another line).

A hash chain has no secret: it proves the lines have not changed *since the head was written down
somewhere else*. Cutting lines off the end, or rewriting the whole file, leaves a valid chain. Two
things close that gap: entries anchored in a token (an :class:`Anchor`, see
:mod:`iscl_hsm.keys.anchor`: a MAC in the entry's ``mac`` field, which ``hash`` does not cover since
the MAC is computed over ``hash``, and a count kept in the token), and, for logs checked without
the token, the head hash that :func:`verify` reports, recorded in the paper log book and passed
later as ``head``.

The log records what was done, by whom (officer, OS user, host; and the witness, under dual
control), on which token, to which key (purpose, index, version, KCV) and the result; never a key,
a component, a PIN or a passphrase.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from iscl_hsm.errors import ErrorCode, KeyHolderError
from iscl_hsm.keyholder.key_records import utc_text
from iscl_hsm.locking import lock_exclusive

__all__ = ["GENESIS", "Anchor", "AuditError", "AuditLog", "AuditReport", "entry_hash", "verify"]

GENESIS: Final = "0" * 64
FIELDS: Final = (
    "time",
    "host",
    "user",
    "officer",
    "witness",
    "token",
    "serial",
    "action",
    "purpose",
    "index",
    "version",
    "kcv",
    "result",
    "detail",
)
"""What a caller may record; ``seq``, ``prev``, ``hash`` (and ``mac``) are added by :meth:`AuditLog.append`."""
UNHASHED: Final = ("hash", "mac")
"""Fields an entry's hash does not cover: the hash itself, and the MAC computed over it."""
MIN_HEAD_DIGITS: Final = 12


class AuditError(KeyHolderError):
    """The audit log cannot be written, or its chain is broken (the message names the line)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message, ErrorCode.AUDIT_LOG)
        self.line = line


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def entry_hash(entry: dict[str, Any]) -> str:
    """The hash of one entry: SHA-256 of ``prev`` and the canonical JSON of the rest (less UNHASHED)."""
    body = {k: v for k, v in entry.items() if k not in UNHASHED}
    return hashlib.sha256(str(entry.get("prev", "")).encode("ascii") + b"\n" + _canonical(body)).hexdigest()


def os_user() -> str:
    """Who runs this process, as the OS knows them (getpass finds no name without a passwd entry)."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"


class Anchor(Protocol):
    """Anchors entries in a token (:class:`iscl_hsm.keys.anchor.TokenAnchor`) while the log is locked."""

    def seal(self, entry: dict[str, Any]) -> str:
        """The entry's MAC, over its ``hash``, computed in the token; changes nothing there."""
        ...

    def advance(self, path: Path, entry: dict[str, Any], log: Callable[[], list[dict[str, Any]]]) -> None:
        """Record in the token that ``entry``, now in the log at ``path``, is its last anchored entry."""
        ...


class AuditLog:
    """Appends chained entries to ``path`` (created 0600 with its directory 0700 if missing)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, anchor: Anchor | None = None, **fields: Any) -> dict[str, Any]:
        """Append one entry made of ``fields`` (see FIELDS); return it with seq, prev and hash.

        With ``anchor``, the entry is sealed (its MAC computed in the token) before it is written,
        and the token's anchor advanced after the line is on disk, both under the file's lock. A
        crash between the two leaves one anchored entry beyond the token's count, which the next
        anchored append takes in and :func:`iscl_hsm.keys.anchor.verify_anchored` reports; never the
        token counting an entry the file lacks.
        """
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown audit fields: {', '.join(sorted(unknown))}")
        entry: dict[str, Any] = {name: fields.get(name) for name in FIELDS}
        entry["time"] = entry["time"] or utc_text()
        entry["host"] = entry["host"] or socket.gethostname()
        entry["user"] = entry["user"] or os_user()
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise AuditError(
                f"cannot open the audit log {self.path}: {exc.strerror};"
                " pass --audit-log with a writable file"
            ) from None
        with os.fdopen(fd, "r+b") as handle:
            lock_exclusive(handle)  # one writer at a time; released when the file closes
            last = _last_line(handle)
            if last is None:
                entry["seq"], entry["prev"] = 1, GENESIS
            else:
                try:
                    previous = json.loads(last)
                    entry["seq"], entry["prev"] = int(previous["seq"]) + 1, str(previous["hash"])
                except (ValueError, KeyError, TypeError):
                    raise AuditError(
                        f"the last line of the audit log {self.path} is not an audit entry; run"
                        " 'iscl keys audit verify' and keep the log as it is for the auditor"
                    ) from None
            entry["hash"] = entry_hash(entry)
            if anchor is not None:
                entry["mac"] = anchor.seal(entry)
            handle.seek(0, os.SEEK_END)
            handle.write(_canonical(entry) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
            if anchor is not None:
                anchor.advance(self.path, entry, lambda: _parse(handle))
        return entry


def _parse(handle: Any) -> list[dict[str, Any]]:
    """Every line of the open log that is an audit entry (the chain is :func:`verify`'s business)."""
    handle.seek(0)
    entries = []
    for raw in handle.read().split(b"\n"):
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _last_line(handle: Any) -> bytes | None:
    """The last non-empty line of the open file, read backwards from its end."""
    handle.seek(0, os.SEEK_END)
    end = handle.tell()
    if end == 0:
        return None
    size = min(end, 64 * 1024)
    while True:
        handle.seek(end - size)
        chunk = handle.read(size).rstrip(b"\n")
        if b"\n" in chunk or size == end:
            line = chunk.rsplit(b"\n", 1)[-1]
            return line or None
        size = min(end, size * 2)


@dataclass(frozen=True)
class AuditReport:
    """A verified log: how many entries, the head hash to write down, and the entries themselves."""

    path: Path
    head: str
    head_entry: int | None = None
    """The entry (seq) a recorded head given to :func:`verify` matched."""
    chain: tuple[dict[str, Any], ...] = ()

    @property
    def entries(self) -> int:
        return len(self.chain)


def _recorded_head(head: str) -> str:
    text = head.strip().lower()
    if not MIN_HEAD_DIGITS <= len(text) <= 64 or any(c not in "0123456789abcdef" for c in text):
        raise KeyHolderError(
            f"--head {head!r} is not a head: give the hash written in the log book, at least its first"
            f" {MIN_HEAD_DIGITS} hex digits",
            ErrorCode.BAD_OPTION,
        )
    return text


def verify(path: Path, head: str | None = None) -> AuditReport:
    """Check every line of the log at ``path``; raise :class:`AuditError` naming the first bad line.

    ``head``, when given, must be the hash of an entry of the log (the head recorded earlier), or
    its first 12 or more hex digits, matching one entry: a log cut short before that entry fails.
    The report's ``head`` is the hash of the last entry.
    """
    path = Path(path)
    wanted = None if head is None else _recorded_head(head)
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as exc:
        raise AuditError(f"cannot read the audit log {path}: {exc.strerror}") from None
    if lines and lines[-1] == b"":
        lines.pop()

    def later_seqs(number: int) -> set[int]:
        found = set()
        for raw in lines[number:]:
            try:
                found.add(int(json.loads(raw)["seq"]))
            except (ValueError, KeyError, TypeError):
                pass
        return found

    previous_hash, previous_seq = GENESIS, 0
    chain, matched = [], []
    for number, raw in enumerate(lines, 1):
        where = f"line {number} of the audit log {path}"
        try:
            entry = json.loads(raw)
            seq, prev, stated = int(entry["seq"]), str(entry["prev"]), str(entry["hash"])
        except (ValueError, KeyError, TypeError):
            raise AuditError(f"{where} is not an audit entry: it was edited or damaged", number) from None
        if entry_hash(entry) != stated:
            raise AuditError(f"{where} (entry {seq}) was edited: its hash does not match its content", number)
        if seq > previous_seq + 1 and (previous_seq + 1) in later_seqs(number):
            raise AuditError(
                f"{where} is entry {seq} but entry {previous_seq + 1} should come next, and it comes later:"
                " lines were reordered",
                number,
            )
        if seq > previous_seq + 1:
            raise AuditError(
                f"{where} is entry {seq} but entry {previous_seq + 1} should come next:"
                f" {'an entry was' if seq == previous_seq + 2 else 'entries were'} removed before it",
                number,
            )
        if seq <= previous_seq or prev != previous_hash:
            raise AuditError(
                f"{where} (entry {seq}) does not follow the line before it: lines were reordered,"
                " or one was replaced",
                number,
            )
        previous_hash, previous_seq = stated, seq
        chain.append(entry)
        if wanted is not None and stated.startswith(wanted):
            matched.append(seq)
    if wanted is not None and not matched:
        raise AuditError(
            f"the audit log {path} does not contain the recorded head {head}: entries were removed from"
            " its end, or the log was replaced"
        )
    if len(matched) > 1:
        raise KeyHolderError(
            f"the recorded head {head} matches entries {', '.join(map(str, matched))} of the audit log {path};"
            " give more of its digits",
            ErrorCode.BAD_OPTION,
        )
    return AuditReport(path, previous_hash, matched[0] if matched else None, tuple(chain))
