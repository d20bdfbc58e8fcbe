"""`iscl keys backup` and `iscl keys restore`: every exportable key of a token in one bound file.

The work is done by :mod:`iscl_hsm.keys.backup`; this module adds the options, the output and the
audit entry. Registered by :func:`iscl_hsm.cli.keys.add_commands`, whose helpers it uses.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..keys.backup import backup, parse_backup, restore
from ..keys.store import KeyInfo
from .audited import AuditEntry
from .ceremony import Console, read_text_file, refuse_existing, write_new_files
from .keys import (
    add_action,
    opened_store,
    print_key,
    transport_index,
)
from .witnessed import check_witness

BACKUP_FILE = "backup file"
NO_TRANSPORT_KEYS = (
    "transport keys are never backed up: give a new token its transport key by a component ceremony"
    " (import-components --purpose transport, from the custodians' forms) before restoring into it"
)


def add_backup_commands(actions: Any) -> None:
    """The backup and restore actions of `iscl keys`."""
    p = add_action(
        actions,
        "backup",
        "wrap every key that can leave the token under a transport key, into one file",
        _backup,
    )
    p.add_argument(
        "--wrap-with",
        metavar="TRANSPORT",
        required=True,
        help="transport key: its label iscl-transport-N, or N; the token to restore into must hold the same"
        " one. " + NO_TRANSPORT_KEYS,
    )
    p.add_argument(
        "--out", metavar="FILE", type=Path, required=True, help="the backup file to write (new, mode 0600)"
    )
    p = add_action(
        actions,
        "restore",
        "install every key of a backup, with its versions and records, into a token holding its transport key",
        _restore,
    )
    p.add_argument("file", type=Path, help="the file written by 'iscl keys backup'")
    p.add_argument(
        "--replace",
        action="store_true",
        help="destroy every version of the keys the backup holds that the token holds already, then restore"
        " (without it such a token is refused)",
    )


def _backup(args: argparse.Namespace, action: AuditEntry) -> int:
    transport = transport_index(args.wrap_with)
    refuse_existing(args.out, BACKUP_FILE)
    with opened_store(args, action) as store:
        action.fields["serial"] = store.serial
        check_witness(args, store, action, Console(args).secret)
        made = backup(store, transport)
    wrapping = made.document["wrapping"]
    under = f"{wrapping['transport_label']} (KCV {wrapping['transport_kcv']})"
    count = f"{len(made.saved)} key version" + ("s" if len(made.saved) != 1 else "")
    action.add_detail(f"{count} wrapped under {under}: " + _names(made.saved))
    if made.left_out:
        action.add_detail("left out " + _names([info for info, _ in made.left_out]))
    write_new_files({args.out: json.dumps(made.document, indent=2) + "\n"}, BACKUP_FILE)
    for info in made.saved:
        print(f"backed up {info.name} ({info.kind_text}), KCV {info.kcv}")
    for info, why in made.left_out:
        print(f"left out: {why} (KCV {info.kcv})")
    print(
        f"{count} written to {args.out}, wrapped under {under}; restore with"
        f" 'iscl keys restore {args.out}' into a token that holds the same transport key"
    )
    print(f"note: {NO_TRANSPORT_KEYS}")
    return 0


def _restore(args: argparse.Namespace, action: AuditEntry) -> int:
    document = parse_backup(read_text_file(args.file, BACKUP_FILE), str(args.file))
    action.add_detail(f"from {args.file}")
    with opened_store(args, action) as store:
        action.fields["serial"] = store.serial
        check_witness(args, store, action, Console(args).secret)
        restored = restore(store, document, replace=args.replace)
    source = document["source"]  # verified by now: the file is bound to the transport key
    action.add_detail(
        f"backup of token {source.get('token')} serial {source.get('serial')} made {document.get('made')};"
        + (" replaced and" if args.replace else "")
        + " restored "
        + _names(restored),
    )
    for info in restored:
        print_key("restored", info, store)
    for left in document["left_out"]:
        print(f"not in the backup: {left.get('why')} (KCV {left.get('kcv')})")
    return 0


def _names(infos: list[KeyInfo]) -> str:
    """``iscl-auth-1 version 2 KCV 0A1B2C, ...`` for an audit entry's detail (KCVs only, never a key)."""
    return ", ".join(f"{info.name} KCV {info.kcv}" for info in infos)
