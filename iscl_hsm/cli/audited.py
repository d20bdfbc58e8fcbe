"""The audit entry every key or card ceremony appends (`iscl keys`, `iscl card`): one shape, one log.

A command runs inside :func:`audited`, which writes exactly one entry when it ends: ``ok``,
``failed: why`` or ``refused: why``. Commands that change a token or a card need an officer's name.
Entries never hold a PIN or a key value; key check values (KCVs) are fine. A command that opened a
token hands its key store to the entry (:meth:`AuditEntry.anchor_in`), which anchors the entry in
that token (:mod:`iscl_hsm.keys.anchor`) and closes the store's key holder once the entry is written.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ErrorCode, IsclError, KeyHolderError
from ..keyholder.pkcs11 import Pkcs11KeyHolder
from ..keyholder.provision import default_data_dir
from ..keys.anchor import SealError, TokenAnchor
from ..keys.audit import AuditLog
from ..keys.store import KeyStore


def add_audit_arguments(parser: argparse.ArgumentParser, *, officer_required: bool) -> None:
    """--audit-log and --officer."""
    group = parser.add_argument_group("audit", "The entry never holds a PIN or a key; KCVs only.")
    group.add_argument("--audit-log", metavar="FILE", type=Path,
                       help=f"append the audit entry here (default: {default_audit_log()})")
    group.add_argument("--officer", metavar="NAME",
                       help="who is doing this, for the audit log (default: $ISCL_OFFICER)"
                       + ("; required" if officer_required else ""))


def default_audit_log() -> Path:
    return default_data_dir() / "audit.log"


class AuditEntry:
    """One command's audit entry, filled in (``fields``) as the command learns what it did."""

    def __init__(
        self, args: argparse.Namespace, command: str, action: str, subject: str | None, changes: str | None
    ) -> None:
        self.log = AuditLog(args.audit_log or default_audit_log())
        officer = (args.officer or os.environ.get("ISCL_OFFICER") or "").strip() or None
        self.fields: dict[str, Any] = {
            "officer": officer,
            "witness": getattr(args, "witness", None),  # the second officer (dual control), when named
            "token": subject,
            "serial": None,
            "action": action,
            "purpose": getattr(args, "purpose", None),
            "index": getattr(args, "index", None),
            "version": None,
            "kcv": None,
            "detail": None,
        }
        self._store: KeyStore | None = None
        self._holders: list[Pkcs11KeyHolder] = []
        if changes is not None and officer is None:
            raise KeyHolderError(
                f"'iscl {command}' changes {changes}, so the audit log needs your name: pass --officer NAME"
                " or set ISCL_OFFICER",
                ErrorCode.BAD_OPTION,
            )

    def anchor_in(self, store: KeyStore) -> KeyStore:
        """Anchor this entry in ``store``'s token; its key holder stays open until the entry is written."""
        self._store = store
        self._holders.append(store.holder)
        return store

    def add_detail(self, text: str) -> None:
        """Append ``text`` to the detail (details are joined with '; ')."""
        self.fields["detail"] = "; ".join(filter(None, [self.fields["detail"], text]))

    def write(self, result: str) -> dict[str, Any]:
        """Append the entry (anchored in the token of the last store handed over, if still open)."""
        try:
            return self._append(result)
        finally:
            for holder in self._holders:
                holder.close()

    def _append(self, result: str) -> dict[str, Any]:
        if self._store is None or self._store.holder.closed:
            return self.log.append(result=result, **self.fields)
        anchor = TokenAnchor(self._store)
        self.fields.update(token=anchor.label, serial=anchor.serial)
        try:
            return self.log.append(anchor, result=result, **self.fields)
        except SealError as exc:  # nothing was written: write it unanchored, saying why
            self.add_detail(f"not anchored: {exc.args[0]}")
            return self.log.append(result=result, **self.fields)


def audited(
    command: str,
    action: str,
    subject: Callable[[argparse.Namespace], str | None],
    run: Callable[[argparse.Namespace, AuditEntry], int],
    *,
    changes: str | None,
) -> Callable[[argparse.Namespace], int]:
    """Run ``run(args, entry)``, then append its outcome to the audit log.

    ``command`` is what the user typed after ``iscl`` (``keys generate``), ``action`` what the entry
    records (``generate``, ``card init``), ``subject(args)`` the token or card as the options name it,
    and ``changes`` what the command changes ("the token"), which makes an officer's name required;
    None for commands that only read.
    """

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            entry = AuditEntry(args, command, action, subject(args), changes)
        except IsclError as exc:  # no officer: still leave a trace of the attempt
            with contextlib.suppress(IsclError, OSError):  # best effort: the refusal is what matters
                AuditLog(args.audit_log or default_audit_log()).append(
                    action=action, token=subject(args), result=f"refused: {exc.args[0]}"
                )
            raise
        try:
            status = run(args, entry)
        except IsclError as exc:
            entry.write(f"failed: {exc.args[0]}")
            raise
        except KeyboardInterrupt:
            entry.write("failed: interrupted")
            raise
        entry.write("ok" if status == 0 else f"failed: exit status {status}")
        return status

    return wrapper
