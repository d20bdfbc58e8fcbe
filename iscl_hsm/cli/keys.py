"""`iscl keys`: key management for security officers (see docs/security-officer.md).

This module parses options, prompts, prints and writes the audit log; the work is done by
:mod:`iscl_hsm.keys`. Secrets (PINs, components) are read without echo, each typed twice, or from
files / a file descriptor for scripted use (tests and automation). Components are shown only on a
terminal's alternate screen, wiped afterwards, or written to new files (custodians' forms with
--form-dir, --component-file): see :mod:`.ceremony`. A key or PIN is never printed, logged or written
to the audit log.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import ErrorCode, KeyHolderConfigError, KeyHolderError
from ..keyholder.key_records import utc_text
from ..keyholder.pkcs11 import PURPOSES, Pkcs11KeyHolder
from ..keyholder.provision import default_data_dir, init_token, softhsm_environment, use_softhsm_conf
from ..keys import audit as audit_log
from ..keys.components import (
    Algorithm,
    algorithm_for,
    kcv_of,
    parse_kcv,
    split,
)
from ..keys.lifetime import NOT_AFTER_HELP, expiry_flag, parse_duration, parse_not_after
from ..keys.store import (
    EXPORTABLE,
    HOST_READABLE,
    KINDS,
    LOOSELY_EXTRACTABLE,
    NEW,
    REPLACE,
    ROTATE,
    KeyInfo,
    KeyStore,
    check_kind,
    parse_wrapped,
    trusted_transport_value,
    verify_so_pin,
)
from ..shared import doc_reference
from .audit_anchor import verify_in_token
from .audited import AuditEntry, add_audit_arguments, audited
from .ceremony import (
    Console,
    collect_components,
    read_secret_file,
    read_text_file,
    refuse_existing,
    show_components,
    write_new_files,
)
from .options import add_key_holder_options, read_pin
from .witnessed import WITNESSED, add_witness_arguments, check_witness

MUTATING = True
WRAPPED_KEY_FILE = "wrapped-key file"
HOST_READABLE_HELP = (
    "enc keys only, for V1.00 links: a V1.00 link with encryption key id 1..8 uses encryption key N itself"
    " as the DES key of every message. A host-readable key is read by the host once per process, so that"
    " OpenSSL protects the records (fast); without this option the key stays sensitive and is used inside"
    " the token (slower). Anyone logged in with the user PIN can read a host-readable key's value."
    " Not with --exportable"
)
_KIND_LEGEND = {
    EXPORTABLE: "its value leaves the token only wrapped under a trusted transport key",
    HOST_READABLE: "V1.00 links read it once per process and protect records with OpenSSL;"
    " anyone logged in with the user PIN can read it",
    LOOSELY_EXTRACTABLE: "off the ISCL policy: any wrapping key can take it out; create it again",
}
"""What ``iscl keys list`` says below its table about the kinds other than non-extractable."""
_EXPIRED_ADVICE = "links with it fail; rotate it at both sites (iscl keys rotate)"
_EXPIRING_ADVICE = "rotate it at both sites before then (iscl keys rotate)"
"""What ``iscl keys list`` says below its table about a current version that expired, or soon will."""


# --------------------------------------------------------------------------------------------------
# Options


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    keys = sub.add_parser(
        "keys",
        help="key management for security officers: ceremonies, rotation, moving keys, audit",
        description="Create, check, rotate, move and delete the ISCL keys of a PKCS#11 token, with key"
        " check values and an audit log. Exportable keys move to another token with export and"
        " import-wrapped, and are kept with backup and restore, always wrapped under a transport key that"
        " both tokens hold and bound to it, so that no field of the file can be edited. Every action but"
        " init-token and audit names its token: --token LABEL or ISCL_TOKEN. Exit status: 0 done; 1 a"
        " check failed (a KCV, the audit log, a key file), a confirmation was refused, or the key is not"
        " there; 2 the command as typed cannot be carried out; 3 the token cannot be used (not found,"
        " wrong or locked PIN, no module). The step-by-step ceremony is in `iscl docs security-officer`.",
    )
    actions = keys.add_subparsers(title="actions", metavar="ACTION", required=True)

    p = add_action(actions, "init-token", "initialise a SoftHSM2 token (SO PIN and user PIN)", _init_token)
    p.add_argument("--label", required=True, help="label of the new token (1..32 bytes)")
    p.add_argument(
        "--so-pin-file", metavar="FILE", type=Path, help="read the new SO PIN from FILE (else prompt twice)"
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="erase and initialise again a token of that label (needs its SO PIN)",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--softhsm-conf",
        metavar="FILE",
        type=Path,
        help="create the token in the SoftHSM2 configuration FILE: used as it is if it exists, else"
        " written (its tokens in the directory 'tokens' beside it); the other commands then need"
        " SOFTHSM2_CONF=FILE, which the command prints (default: the configuration SOFTHSM2_CONF names)",
    )
    where.add_argument(
        "--softhsm-dir",
        metavar="DIR",
        type=Path,
        help="the same with FILE DIR/softhsm2.conf, written afresh, e.g. in a service's state directory"
        " /var/lib/iscl/INSTANCE (the units set SOFTHSM2_CONF to it)",
    )
    p.add_argument(
        "--input-fd",
        metavar="FD",
        type=int,
        help="tests and automation: read the PINs, each twice, line by line from this descriptor",
    )

    p = add_action(actions, "list", "list the keys (never their values)", _list, mutating=False)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add_action(actions, "generate", "generate a key inside the token", _generate)
    _key_arguments(p)
    _creation_arguments(p)

    p = add_action(
        actions, "import-components", "enter a key as 2 or 3 custodian components", _import_components
    )
    _key_arguments(p)
    _creation_arguments(p)
    add_component_arguments(p, reading=True)

    p = add_action(
        actions,
        "generate-components",
        "make a random key, show its components, store it",
        _generate_components,
    )
    _key_arguments(p)
    _creation_arguments(p)
    add_component_arguments(p, reading=False)

    p = add_action(actions, "export", "wrap an exportable key under a transport key, for another token", _export)
    _key_arguments(p)
    p.add_argument(
        "--wrap-with",
        metavar="TRANSPORT",
        required=True,
        help="transport key: its label iscl-transport-N, or N",
    )
    p.add_argument("--out", metavar="FILE", type=Path, help="write the wrapped key here (default: stdout)")

    p = add_action(actions, "import-wrapped", "unwrap a key exported by another token", _import_wrapped)
    p.add_argument("file", type=Path, help="the file written by 'iscl keys export'")
    p.add_argument("--replace", action="store_true", help="replace a key already at that index")
    p.add_argument(
        "--grace", metavar="DURATION", help="rotate: keep the older versions for DURATION (e.g. 7d)"
    )
    p.add_argument(
        "--exportable", action="store_true", help="let the key be exported again (trusted wrap only)"
    )
    p.add_argument("--host-readable", action="store_true", help=HOST_READABLE_HELP)
    p.add_argument("--not-after", metavar="DATE|DURATION", help=NOT_AFTER_HELP)

    from .keys_backup import add_backup_commands  # here: it uses this module's helpers

    add_backup_commands(actions)

    p = add_action(actions, "check", "does this token hold the key with this KCV?", _check, mutating=False)
    _key_arguments(p)
    p.add_argument("--kcv", required=True, help="the key check value the other site reports (6 hex digits)")

    p = add_action(actions, "rotate", "make a new version current; keep the old one for a grace period", _rotate)
    _key_arguments(p)
    _creation_arguments(p, replace=False)
    p.add_argument(
        "--grace",
        metavar="DURATION",
        required=True,
        help="how long the previous version stays on the token: 30m, 12h, 7d, or 0",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--generate-components",
        metavar="K",
        type=int,
        dest="gen_components",
        help="the new version is made here and shown as K components",
    )
    source.add_argument(
        "--import-components",
        metavar="K",
        type=int,
        dest="imp_components",
        help="the new version is entered as K components",
    )
    add_component_arguments(p, reading=None)

    p = add_action(actions, "retire", "remove previous versions whose grace period has passed", _retire)
    p.add_argument("--purpose", help="auth, enc or transport (default: every key)")
    p.add_argument("--index", type=int, help="key index 1..8 (with --purpose)")
    p.add_argument(
        "--now",
        action="store_true",
        help="remove every previous version, grace period or not (asks for confirmation first)",
    )
    _confirmation_arguments(p)

    p = add_action(actions, "delete", "destroy a key (every version, or one)", _delete)
    _key_arguments(p)
    p.add_argument("--version", type=int, help="only this version")
    _confirmation_arguments(p)

    audit = actions.add_parser(
        "audit",
        help="the audit log",
        description="Check the audit log: its hash chain, and with --token the entries anchored in the token.",
    )
    audit_actions = audit.add_subparsers(title="audit actions", metavar="ACTION", required=True)
    p = audit_actions.add_parser(
        "verify",
        help="check that no line was edited, removed or reordered, and none cut off (with --token)",
        description="Recompute the audit log's hash chain. With --token, also check the log against the"
        " token it was written with: every entry anchored there must carry a MAC the token confirms, and"
        " the token's count of anchored entries and its last one must match the log, so a log cut short,"
        " emptied, rewritten or taken from another token fails. Without --token, record the head it"
        " prints and pass it as --head next time to detect lines cut off the end.",
    )
    p.add_argument(
        "--audit-log", metavar="FILE", type=Path, help=f"default: {default_data_dir() / 'audit.log'}"
    )
    p.add_argument(
        "--head",
        metavar="HASH",
        help="a head recorded earlier, which must still be in the log: the whole hash or its first 12 or"
        " more hex digits",
    )
    add_key_holder_options(
        p,
        record_keys=False,
        description="The token the log's entries are anchored in (see 'The audit log' in"
        " `iscl docs security-officer`). Without --token or $ISCL_TOKEN only the chain is checked.",
        token_help="check the log against this token's audit anchor (else $ISCL_TOKEN; needs its user PIN)",
    )
    p.set_defaults(run=_audit_verify)

    from .dual_control import add_dual_control_commands  # (it builds on this module: imported last)

    add_dual_control_commands(actions)


def add_action(
    actions: Any,
    name: str,
    text: str,
    run: Callable[..., int],
    *,
    mutating: bool = MUTATING,
    within: str = "",
) -> Any:
    """Add action ``name`` (of the group ``within``, e.g. "policy"), run by ``run`` inside its audit entry."""
    action = f"{within} {name}".strip()
    parser = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
    if name != "init-token":
        add_key_holder_options(
            parser,
            record_keys=False,
            description="The token whose keys the command manages; there is no default token.",
            token_help="label of the token (required, or set ISCL_TOKEN; `iscl keys init-token` makes one)",
        )
    else:
        group = parser.add_argument_group("token")
        from ..keyholder.pkcs11 import DEFAULT_MODULE

        group.add_argument(
            "--pkcs11-module", metavar="PATH", default=DEFAULT_MODULE, help="default: %(default)s"
        )
        group.add_argument(
            "--pin-file",
            metavar="FILE",
            type=Path,
            help="read the new user PIN from FILE (else prompt twice)",
        )
    if action in WITNESSED:
        add_witness_arguments(parser)
    add_audit_arguments(parser, officer_required=mutating)
    parser.set_defaults(
        run=audited(
            f"keys {action}", action, _token_named(name), run, changes="the token" if mutating else None
        )
    )
    return parser


def _confirmation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    parser.add_argument("--input-fd", metavar="FD", type=int, help="read the confirmation from this descriptor")


def _key_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--purpose", required=True, help="auth, enc or transport")
    parser.add_argument("--index", type=int, required=True, help="key index 1..8")


def _creation_arguments(parser: argparse.ArgumentParser, *, replace: bool = True) -> None:
    parser.add_argument(
        "--algorithm",
        help="des (default), des2 or des3 for auth/enc; aes256 (default) or aes128 for transport",
    )
    parser.add_argument(
        "--exportable",
        action="store_true",
        help="the key may later be exported, wrapped under a trusted transport key only",
    )
    parser.add_argument("--host-readable", action="store_true", help=HOST_READABLE_HELP)
    parser.add_argument("--not-after", metavar="DATE|DURATION", help=NOT_AFTER_HELP)
    if replace:
        parser.add_argument("--replace", action="store_true", help="replace a key already at that index")
    parser.add_argument(
        "--so-pin-file",
        metavar="FILE",
        type=Path,
        help="SO PIN, needed to mark a transport key trusted (else a prompt)",
    )


def add_component_arguments(parser: argparse.ArgumentParser, *, reading: bool | None) -> None:
    """reading True: import-components; False: generate-components; None: rotate (either)."""
    if reading is not None:
        parser.add_argument("--components", type=int, required=True, help="number of components: 2 or 3")
    group = parser.add_argument_group(
        "scripted use (tests and automation only: in a ceremony, custodians type and read at the terminal)"
    )
    group.add_argument(
        "--component-file",
        metavar="FILE",
        type=Path,
        action="append",
        default=[],
        help="once per component: read it from FILE (import) / write it to FILE, mode 0600 (generate)",
    )
    group.add_argument(
        "--input-fd",
        metavar="FD",
        type=int,
        help="read the answers to the prompts (components, confirmations, Enter) line by line"
        " from this file descriptor instead of the terminal",
    )
    group.add_argument("--yes", action="store_true", help="confirm every KCV without asking")
    if reading is not True:
        parser.add_argument(
            "--form-dir",
            metavar="DIR",
            type=Path,
            help="components made here: instead of showing each on a screen of its own (wiped afterwards,"
            " with the scrollback), write each custodian's component form, to print and seal, to a new file"
            " in DIR, mode 0600 (e.g. DIR/iscl-auth-1-component-1-of-2.txt); the other site's"
            " import-components reads a form with --component-file",
        )
    if reading is not False:
        parser.add_argument(
            "--fix-parity",
            action="store_true",
            help="adjust a DES component with wrong parity instead of refusing it",
        )


# --------------------------------------------------------------------------------------------------
# Audit, errors, prompts


def _token_named(name: str) -> Callable[[argparse.Namespace], str | None]:
    """The token as a `keys` command's options name it (init-token names the one it creates)."""
    if name == "init-token":
        return lambda args: getattr(args, "label", None)
    return _given_token


def _given_token(args: argparse.Namespace) -> str | None:
    """--token, else $ISCL_TOKEN, else None: `iscl keys` never picks a token by itself."""
    return args.token or os.environ.get("ISCL_TOKEN", "").strip() or None


def _record_key(entry: AuditEntry, info: KeyInfo, store: KeyStore | None = None) -> None:
    """Put the key a command touched (and the token's serial) into its audit entry."""
    entry.fields.update(purpose=info.purpose, index=info.index, version=info.version, kcv=info.kcv)
    if store is not None:
        entry.fields["serial"] = store.serial


def _record_created(entry: AuditEntry, info: KeyInfo, store: KeyStore) -> None:
    """The key a command created, with its kind (who can read or move its value) in the detail."""
    _record_key(entry, info, store)
    entry.add_detail(f"kind {info.kind}")


# --------------------------------------------------------------------------------------------------
# Helpers


def _purpose_index(args: argparse.Namespace, allowed: tuple[str, ...] = tuple(PURPOSES)) -> tuple[str, int]:
    purpose, index = args.purpose, args.index
    if purpose not in PURPOSES:
        raise KeyHolderError(
            f"unknown key purpose {purpose!r}; use auth, enc or transport", ErrorCode.BAD_OPTION
        )
    if purpose not in allowed:
        raise KeyHolderError(
            f"'{purpose}' keys cannot be used here; use {' or '.join(allowed)}", ErrorCode.BAD_OPTION
        )
    if not 1 <= index <= 8:
        raise KeyHolderError(f"key index {index} is outside 1..8", ErrorCode.BAD_OPTION)
    return purpose, index


def component_count(count: int | None) -> int:
    if count not in (2, 3):
        raise KeyHolderError(f"a key is entered as 2 or 3 components, not {count}", ErrorCode.BAD_OPTION)
    return count




def label_and_pin(args: argparse.Namespace) -> tuple[str, str]:
    """Token label (required: a key ceremony on a token picked by default would go unnoticed) and
    user PIN, as the shared options give them."""
    label = _given_token(args)
    if label is None:
        raise KeyHolderError(
            "name the token: pass --token LABEL or set ISCL_TOKEN (`iscl keys init-token --label LABEL`"
            " makes a token)",
            ErrorCode.BAD_OPTION,
        )
    return label, read_pin(args.pin_file, f"token '{label}'")


@contextlib.contextmanager
def opened_store(args: argparse.Namespace, entry: AuditEntry) -> Iterator[KeyStore]:
    """The key store of the token the shared options name. It stays open until ``entry`` is written,
    anchored in the token; the entry closes it."""
    label, pin = label_and_pin(args)
    yield anchored_store(entry, label, pin, args.pkcs11_module)


def anchored_store(entry: AuditEntry, label: str, pin: str, module: str) -> KeyStore:
    """The key store of token ``label``, handed to ``entry``, which closes it once written (anchored)."""
    return entry.anchor_in(KeyStore(Pkcs11KeyHolder(label, pin, module)))


def ask_so_pin(
    args: argparse.Namespace, console: Console, label: str, why: str = "to mark the transport key trusted"
) -> str:
    if args.so_pin_file is not None:
        return read_secret_file(args.so_pin_file, "SO PIN")
    return console.secret(f"SO PIN of token '{label}' ({why}): ")


def print_key(prefix: str, info: KeyInfo, store: KeyStore) -> None:
    kind = info.kind_text
    if info.purpose == "transport":
        kind += ", trusted" if info.trusted else ", NOT trusted"
    print(
        f"{prefix} {info.label} version {info.version} on token '{store.token_label}': {info.algorithm},"
        f" {kind}, KCV {info.kcv}" + (f", not after {info.not_after}" if info.not_after else ""),
        flush=True,
    )
    if expiry_flag(info.not_after) == "EXPIRED":
        print(f"warning: {info.name} has expired already: links refuse it", flush=True)


def _not_after(args: argparse.Namespace, action: AuditEntry) -> datetime.datetime | None:
    """--not-after, checked before anything is typed; the audit entry's detail names it."""
    if args.not_after is None:
        return None
    moment = parse_not_after(args.not_after)
    action.add_detail(f"not after {utc_text(moment)}")
    return moment


# --------------------------------------------------------------------------------------------------
# Commands


def _init_token(args: argparse.Namespace, action: AuditEntry) -> int:
    conf = _use_softhsm_conf(args)  # before the PINs are asked for: a bad directory fails at once
    console = Console(args)
    if args.so_pin_file is not None:
        so_pin = read_secret_file(args.so_pin_file, "SO PIN")
    else:
        so_pin = console.secret_twice(f"new SO PIN for token '{args.label}'")
    if args.pin_file is not None:
        user_pin = read_secret_file(args.pin_file, "user PIN")
    else:
        user_pin = console.secret_twice(f"new user PIN for token '{args.label}'")
    if so_pin == user_pin:
        raise KeyHolderError("the SO PIN and the user PIN must differ", ErrorCode.BAD_OPTION)
    init_token(args.label, so_pin, user_pin, args.pkcs11_module, replace=args.replace)
    action.fields["detail"] = "initialised again (erased)" if args.replace else "initialised"
    with contextlib.suppress(Exception):  # the serial is only a nicety of the audit entry
        from ..keyholder.pkcs11 import _load_module

        token = _load_module(args.pkcs11_module).get_token(token_label=args.label)
        action.fields["serial"] = bytes(token.serial).decode("ascii", "replace").strip()
    print(
        f"token '{args.label}' initialised"
        + (f", serial {action.fields['serial']}" if action.fields["serial"] else "")
    )
    if conf is not None:
        print(f"SoftHSM2 configuration {conf}: the other commands need SOFTHSM2_CONF={conf}"
              " (the units set it)")
    return 0


def _use_softhsm_conf(args: argparse.Namespace) -> str | None:
    """--softhsm-conf FILE (used if it exists, else written) or --softhsm-dir DIR (DIR/softhsm2.conf,
    written afresh), made this process's SOFTHSM2_CONF; None without either."""
    if args.softhsm_conf is not None:
        conf = args.softhsm_conf.absolute()
        if conf.is_file():
            use_softhsm_conf(str(conf), args.pkcs11_module)
            return str(conf)
        folder, name = conf.parent, conf.name
    elif args.softhsm_dir is not None:
        folder, name = args.softhsm_dir, "softhsm2.conf"
    else:
        return None
    try:
        written = softhsm_environment(folder, name)["SOFTHSM2_CONF"]
    except OSError as exc:
        raise KeyHolderConfigError(
            f"cannot write the SoftHSM2 configuration in {folder}: {exc.strerror}; run as the service's user,"
            f" on a directory it owns ({doc_reference('systemd.md')})"
        ) from None
    use_softhsm_conf(written, args.pkcs11_module)
    return written


def _list(args: argparse.Namespace, action: AuditEntry) -> int:
    with opened_store(args, action) as store:
        infos = store.list_keys()
        action.fields.update(serial=store.serial, detail=f"{len(infos)} key versions")
        if args.json:
            print(
                json.dumps(
                    {
                        "token": store.token_label,
                        "serial": store.serial,
                        "keys": [info.as_dict() for info in infos],
                    },
                    indent=2,
                )
            )
            return 0
        print(f"token '{store.token_label}' (serial {store.serial}): {len(infos)} key versions")
        if infos:
            print(
                f"{'PURPOSE':9} {'INDEX':5} {'VERSION':7} {'ALGORITHM':9} {'KCV':6}  {'CREATED':20}"
                f" {'KIND':15} STATE"
            )
        warnings = []
        for info in infos:
            state = "current" if info.current else "previous"
            if info.retire_after and not info.current:
                state += f", retire after {info.retire_after}"
            if info.purpose == "transport":
                state += ", trusted" if info.trusted else ", not trusted"
            flag = expiry_flag(info.not_after)
            if flag == "EXPIRED":
                state += f", EXPIRED {info.not_after}"
            elif info.not_after:
                state += f", not after {info.not_after}" + (f" ({flag})" if flag else "")
            if flag and info.current:
                advice = _EXPIRED_ADVICE if flag == "EXPIRED" else _EXPIRING_ADVICE
                warnings.append(f"warning: {info.name} {flag.lower()} ({info.not_after}): {advice}")
            print(
                f"{info.purpose:9} {info.index:<5} {info.version:<7} {info.algorithm:9} {info.kcv or '-':6}"
                f"  {info.created or '-':20} {info.kind:15} {state}"
            )
        for kind in sorted({info.kind for info in infos} & set(_KIND_LEGEND)):
            print(f"{KINDS[kind]}: {_KIND_LEGEND[kind]}")
        for warning in warnings:
            print(warning)
    return 0


def _mode(args: argparse.Namespace) -> str:
    return REPLACE if getattr(args, "replace", False) else NEW


def _generate(args: argparse.Namespace, action: AuditEntry) -> int:
    purpose, index = _purpose_index(args, ("auth", "enc", "transport"))
    if purpose == "transport":
        raise KeyHolderError(
            "a transport key must be the same on both tokens: create it with generate-components on one site"
            " and import-components on the other",
            ErrorCode.BAD_OPTION,
        )
    algorithm = algorithm_for(purpose, args.algorithm)
    return _create(args, action, purpose, index, algorithm, _mode(args), None, "generate")


def _import_components(args: argparse.Namespace, action: AuditEntry) -> int:
    purpose, index = _purpose_index(args)
    algorithm = algorithm_for(purpose, args.algorithm)
    return _create(args, action, purpose, index, algorithm, _mode(args), None, "import-components")


def _generate_components(args: argparse.Namespace, action: AuditEntry) -> int:
    purpose, index = _purpose_index(args)
    algorithm = algorithm_for(purpose, args.algorithm)
    return _create(args, action, purpose, index, algorithm, _mode(args), None, "generate-components")


def _rotate(args: argparse.Namespace, action: AuditEntry) -> int:
    purpose, index = _purpose_index(args)
    algorithm = algorithm_for(purpose, args.algorithm)
    grace = parse_duration(args.grace)
    if args.gen_components is not None:
        args.components, source = args.gen_components, "generate-components"
    elif args.imp_components is not None:
        args.components, source = args.imp_components, "import-components"
    elif purpose == "transport":
        raise KeyHolderError(
            "a new transport key must reach both tokens: rotate it with --generate-components K here and"
            " --import-components K at the other site",
            ErrorCode.BAD_OPTION,
        )
    else:
        source = "generate"
    action.add_detail(f"grace {args.grace}")
    return _create(args, action, purpose, index, algorithm, ROTATE, grace, source)


def _create(
    args: argparse.Namespace,
    action: AuditEntry,
    purpose: str,
    index: int,
    algorithm: Algorithm,
    mode: str,
    grace: datetime.timedelta | None,
    source: str,
) -> int:
    """Every way of putting a key on the token: check first, then collect, then store at once."""
    check_kind(purpose, exportable=args.exportable, host_readable=args.host_readable)
    not_after = _not_after(args, action)
    console = Console(args)
    count = component_count(args.components) if source != "generate" else 0
    files: list[Path] = getattr(args, "component_file", [])
    if files and len(files) != count:
        raise KeyHolderError(
            f"give --component-file once per component: {count} times, not {len(files)}", ErrorCode.BAD_OPTION
        )
    form_dir: Path | None = getattr(args, "form_dir", None)
    if form_dir is not None and (files or source != "generate-components"):
        raise KeyHolderError(
            "--form-dir writes the forms of the components generate-components makes; give it without"
            " --component-file, and only when generating components",
            ErrorCode.BAD_OPTION,
        )
    label, pin = label_and_pin(args)
    action.fields["token"] = label
    trusted_needed = purpose == "transport"
    so_pin = None
    store = anchored_store(action, label, pin, args.pkcs11_module)
    action.fields["serial"] = store.serial
    check_witness(args, store, action, console.secret)
    store.ensure_free(purpose, index, mode)  # before custodians type or read anything
    previous = store.newest(purpose, index)
    if trusted_needed:
        store.holder.close()  # the SO cannot log in while this process is logged in as user
        so_pin = ask_so_pin(args, console, label)
        verify_so_pin(args.pkcs11_module, label, so_pin)  # a wrong SO PIN fails before the ceremony
    value = None
    origin = "generated"
    if source == "generate-components":
        value, components = split(algorithm, count)
        show_components(console, files, store, purpose, index, algorithm, components, form_dir=form_dir)
        origin = "components"
    elif source == "import-components":
        value = collect_components(console, files, args.fix_parity, purpose, index, algorithm, count)
        origin = "components"
    if value is not None:
        print(f"key KCV: {kcv_of(algorithm, value).hex().upper()}", flush=True)
    if trusted_needed:
        assert so_pin is not None and value is not None
        with trusted_transport_value(args.pkcs11_module, label, so_pin, value) as temporary:
            store = anchored_store(action, label, pin, args.pkcs11_module)
            info = store.create(
                purpose,
                index,
                algorithm,
                value,
                mode=mode,
                grace=grace,
                origin=origin,
                trusted=temporary,
                not_after=not_after,
            )
    else:
        info = store.create(
            purpose,
            index,
            algorithm,
            value,
            exportable=args.exportable,
            host_readable=args.host_readable,
            mode=mode,
            grace=grace,
            origin=origin,
            not_after=not_after,
        )
    del value
    _record_created(action, info, store)
    if source != "generate":
        action.add_detail(f"{count} components ({source})")
    print_key("stored", info, store)
    if previous is not None and previous.kind != info.kind:
        print(
            f"note: {previous.name} was {previous.kind_text}; {info.name} is {info.kind_text}"
            + (" (pass --host-readable to keep V1.00 links on the host)" if previous.host_readable else ""),
            flush=True,
        )
    if mode == ROTATE:
        assert grace is not None
        until = datetime.datetime.now(datetime.UTC) + grace
        print(
            f"previous versions stay until {until.isoformat(timespec='seconds').replace('+00:00', 'Z')}"
            " (roll back meanwhile with 'iscl keys delete --version' of the new one); then 'iscl keys retire'"
        )
    return 0


def transport_index(text: str) -> int:
    match = re.fullmatch(r"(?:iscl-transport-)?([1-8])", text.strip())
    if match is None:
        raise KeyHolderError(
            f"--wrap-with {text!r} is not a transport key: give iscl-transport-N or N (1..8)",
            ErrorCode.BAD_OPTION,
        )
    return int(match.group(1))


def _export(args: argparse.Namespace, action: AuditEntry) -> int:
    purpose, index = _purpose_index(args, ("auth", "enc"))
    transport = transport_index(args.wrap_with)
    if args.out is not None:
        refuse_existing(args.out, WRAPPED_KEY_FILE)
    with opened_store(args, action) as store:
        check_witness(args, store, action, Console(args).secret)
        document = store.export(purpose, index, transport)
        info = store.current(purpose, index)
    _record_key(action, info, store)
    action.fields["detail"] = (
        f"wrapped under iscl-transport-{transport} KCV {document['wrapping']['transport_kcv']}"
    )
    text = json.dumps(document, indent=2) + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_new_files({args.out: text}, WRAPPED_KEY_FILE)
    print(
        f"exported {info.label} version {info.version}, KCV {info.kcv},"
        f" wrapped under iscl-transport-{transport}"
        f" (KCV {document['wrapping']['transport_kcv']})",
        file=sys.stderr,
    )
    return 0


def _import_wrapped(args: argparse.Namespace, action: AuditEntry) -> int:
    document = parse_wrapped(read_text_file(args.file, WRAPPED_KEY_FILE), str(args.file))
    action.fields.update(purpose=document["purpose"], index=document["index"], kcv=document["kcv"])
    grace = parse_duration(args.grace) if args.grace is not None else None
    mode = ROTATE if grace is not None else _mode(args)
    not_after = _not_after(args, action)
    with opened_store(args, action) as store:
        action.fields["serial"] = store.serial
        check_witness(args, store, action, Console(args).secret)
        info = store.import_wrapped(
            document,
            mode=mode,
            grace=grace,
            exportable=args.exportable,
            host_readable=args.host_readable,
            not_after=not_after,
        )
    source = document["source"]
    action.add_detail(f"from token {source.get('token')} serial {source.get('serial')}")
    _record_created(action, info, store)
    print_key("imported", info, store)
    return 0


def _check(args: argparse.Namespace, action: AuditEntry) -> int:
    purpose, index = _purpose_index(args)
    wanted = parse_kcv(args.kcv)
    with opened_store(args, action) as store:
        current, matching = store.check(purpose, index, wanted)
    _record_key(action, current, store)
    action.fields["detail"] = f"asked for KCV {wanted.hex().upper()}"
    if matching is not None and matching.current:
        print(
            f"match: token '{store.token_label}' holds {current.label} version {current.version} with KCV"
            f" {current.kcv}"
        )
        return 0
    if matching is not None:
        raise KeyHolderError(
            f"KCV {wanted.hex().upper()} is that of {matching.name}, which is no longer current on token"
            f" '{store.token_label}' (current: version {current.version}, KCV {current.kcv}); the other site"
            " has not rotated yet, or this one rotated too early",
            ErrorCode.KCV_MISMATCH,
        )
    raise KeyHolderError(
        f"no match: token '{store.token_label}' holds {current.label} version {current.version} with KCV"
        f" {current.kcv}, not {wanted.hex().upper()}; the two sites hold different keys",
        ErrorCode.KCV_MISMATCH,
    )


def _retire(args: argparse.Namespace, action: AuditEntry) -> int:
    if args.purpose is not None or args.index is not None:
        if args.purpose is None or args.index is None:
            raise KeyHolderError("give both --purpose and --index, or neither", ErrorCode.BAD_OPTION)
        _purpose_index(args)
    console = Console(args)
    with opened_store(args, action) as store:
        action.fields["serial"] = store.serial
        if args.now or args.witness:  # (the end of a grace period was approved with its rotation)
            check_witness(args, store, action, console.secret)
        if args.now:
            previous = [
                i
                for i in store.list_keys()
                if not i.current and args.purpose in (None, i.purpose) and args.index in (None, i.index)
            ]
            _confirm_destroying(console, store, previous, " now, whatever their grace periods")
        removed = store.retire(args.purpose, args.index, now=args.now)
    action.fields["detail"] = (
        ("removed " + ", ".join(f"{i.name} KCV {i.kcv}" for i in removed)) if removed else "nothing due"
    )
    for info in removed:
        print(f"retired {info.name} (KCV {info.kcv})")
    if not removed:
        print("no previous key version is due for retirement")
    return 0


def _delete(args: argparse.Namespace, action: AuditEntry) -> int:
    purpose, index = _purpose_index(args)
    console = Console(args)
    action.fields["version"] = args.version  # the one asked for; all when None
    with opened_store(args, action) as store:
        action.fields["serial"] = store.serial
        check_witness(args, store, action, console.secret)
        targets = [
            i
            for i in store.list_keys()
            if i.purpose == purpose
            and i.index == index
            and (args.version is None or i.version == args.version)
        ]
        _confirm_destroying(console, store, targets)
        removed = store.delete(purpose, index, args.version)
    if len(removed) == 1:
        _record_key(action, removed[0], store)
    action.fields["detail"] = "deleted " + ", ".join(f"version {i.version} KCV {i.kcv}" for i in removed)
    for info in removed:
        print(f"deleted {info.name} (KCV {info.kcv})")
    return 0


def _confirm_destroying(console: Console, store: KeyStore, targets: list[KeyInfo], when: str = "") -> None:
    """Ask before key versions are destroyed (--yes answers for the officer); nothing to destroy, no question."""
    if not targets:
        return
    which = ", ".join(f"{i.name} (KCV {i.kcv})" for i in targets)
    if not console.confirm(f"Destroy {which} on token '{store.token_label}'{when}? This cannot be undone."):
        raise KeyHolderError("not confirmed; nothing was destroyed", ErrorCode.NOT_CONFIRMED)


def _audit_verify(args: argparse.Namespace) -> int:
    path = args.audit_log or default_data_dir() / "audit.log"
    report = audit_log.verify(path, args.head)
    print(f"audit log {report.path}: {report.entries} entries, chain intact; head {report.head}")
    if report.head_entry is not None:
        print(f"the recorded head {args.head} is entry {report.head_entry}")
    if _given_token(args) is not None:
        label, pin = label_and_pin(args)
        with Pkcs11KeyHolder(label, pin, args.pkcs11_module) as holder:
            print(verify_in_token(report, KeyStore(holder)))
    return 0
