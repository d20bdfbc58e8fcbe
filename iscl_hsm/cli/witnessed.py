"""Dual control at the command line: ``--witness`` on the ceremony commands, checked before anything happens.

Every command in :data:`WITNESSED` gets ``--witness NAME`` and ``--witness-passphrase-file``, and
calls :func:`check_witness` right after it opens the token with the user PIN: before any custodian
types or sees anything, before the SO PIN is asked for, before anything changes. The token's policy
(:mod:`iscl_hsm.keys.policy`) decides whether a witness is required.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Final

from ..errors import ErrorCode, KeyHolderError
from ..keys.policy import DualControl, same_name
from ..keys.store import KeyStore
from .audited import AuditEntry

WITNESSED: Final = (
    "generate",
    "generate-components",
    "import-components",
    "import-wrapped",
    "export",
    "rotate",
    "delete",
    "retire",
    "backup",
    "restore",
    "policy set",
    "witness add",
    "witness remove",
)
"""The `iscl keys` actions (as the audit log names them) that a witness approves under dual control.

The one list: an action named here gets the witness options, and must call :func:`check_witness`;
`retire` only with ``--now`` (or a named witness), since the end of a grace period was approved with
the rotation that set it."""


def add_witness_arguments(parser: argparse.ArgumentParser) -> None:
    """--witness and --witness-passphrase-file."""
    group = parser.add_argument_group(
        "dual control",
        "When the token's policy requires dual control (`iscl keys policy show`), a second officer"
        " registered with `iscl keys witness add` watches the command and types their passphrase first.",
    )
    group.add_argument(
        "--witness",
        metavar="NAME",
        help="the second officer watching this command (required under dual control; recorded in the"
        " audit log in any case)",
    )
    group.add_argument(
        "--witness-passphrase-file",
        metavar="FILE",
        type=Path,
        help="tests and automation: read the witness's passphrase from FILE (else a prompt without echo)",
    )


def read_passphrase(path: Path | None, ask: Callable[[], str]) -> str:
    """A passphrase from ``path`` (for scripts) or ``ask()`` (a prompt without echo); outer spaces dropped."""
    if path is None:
        return ask().strip()
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyHolderError(
            f"cannot read the passphrase file {path}: {getattr(exc, 'strerror', None) or exc}",
            ErrorCode.BAD_OPTION,
        ) from None


def check_witness(
    args: argparse.Namespace, store: KeyStore, entry: AuditEntry, ask: Callable[[str], str]
) -> None:
    """Apply the token's dual-control policy to this command; ``ask(prompt)`` reads a secret without echo.

    Under dual control a witness must be named, must not be the officer, must be registered, and must
    type their passphrase. With the policy off a named witness is recorded, and checked if registered.
    Every refusal is one sentence, and nothing has changed.
    """
    controls = DualControl(store)
    policy = controls.policy()
    name = (args.witness or "").strip()
    if not name:
        if policy.dual_control:
            raise KeyHolderError(
                f"token '{store.token_label}' requires dual control: name a second officer with --witness NAME"
                " (see `iscl keys witness`)",
                ErrorCode.BAD_OPTION,
            )
        return
    entry.fields["witness"] = name
    officer = entry.fields["officer"]
    if officer is not None and same_name(officer, name):
        raise KeyHolderError(
            f"the witness must be a second officer, not {officer}, who runs the command; name another"
            " with --witness",
            ErrorCode.BAD_OPTION,
        )
    witness = controls.find(name)
    if witness is None:
        if policy.dual_control:
            raise controls.unknown(name)
        entry.add_detail(f"witness {name} is not registered on the token, not checked")
        return
    passphrase = read_passphrase(
        args.witness_passphrase_file, lambda: ask(f"passphrase of witness '{witness.name}' (hidden): ")
    )
    if not controls.verify(witness, passphrase):
        raise KeyHolderError(
            f"wrong passphrase for witness '{witness.name}'; nothing was changed",
            ErrorCode.AUTHENTICATION_FAILED,
        )
    entry.fields["witness"] = witness.name
