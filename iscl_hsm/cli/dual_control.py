"""`iscl keys policy` and `iscl keys witness`: dual control, which only the token's SO can change.

The objects live in the token (:mod:`iscl_hsm.keys.policy`); the check every ceremony command makes
is :func:`iscl_hsm.cli.witnessed.check_witness`. Every change here asks for the SO PIN, so that a
user-PIN holder alone can neither switch dual control off nor register a witness whose passphrase
they know; while dual control is on, a change also needs a witness, like any ceremony.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import ErrorCode, KeyHolderError
from ..keyholder.pkcs11 import Pkcs11KeyHolder
from ..keys.policy import MIN_PASSPHRASE, DualControl, check_name, same_name
from ..keys.store import KeyStore, verify_so_pin
from .audited import AuditEntry
from .ceremony import Console
from .keys import add_action, anchored_store, ask_so_pin, label_and_pin, opened_store
from .witnessed import WITNESSED, check_witness, read_passphrase


def add_dual_control_commands(actions: Any) -> None:
    """`policy show|set` and `witness add|list|remove`, under `iscl keys`."""
    policy = actions.add_parser(
        "policy",
        help="dual control: must a second officer witness every ceremony? (show, set)",
        description="The token's policy, kept in the token. With dual control on, these commands need"
        f" --witness NAME: {', '.join(WITNESSED)}. The witness is a second officer, registered with"
        " `iscl keys witness add`, who types their own passphrase before anything happens.",
    )
    policy_actions = policy.add_subparsers(title="policy actions", metavar="ACTION", required=True)
    p = add_action(
        policy_actions,
        "show",
        "show whether the token requires dual control",
        _policy_show,
        mutating=False,
        within="policy",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add_action(
        policy_actions,
        "set",
        "switch dual control on or off: needs the SO PIN, and a witness while it is on",
        _policy_set,
        within="policy",
    )
    p.add_argument("setting", choices=("dual-control",), help="the setting to change: dual-control")
    p.add_argument(
        "value", choices=("on", "off"), help="on: every ceremony command needs --witness; off: it does not"
    )
    _officer_arguments(p)

    witness = actions.add_parser(
        "witness",
        help="the second officers who witness ceremonies under dual control (add, list, remove)",
        description="A witness is a second officer with their own passphrase. The token keeps a slow,"
        " salted hash of it (scrypt), never the passphrase. Adding or removing a witness needs the SO PIN.",
    )
    witness_actions = witness.add_subparsers(title="witness actions", metavar="ACTION", required=True)
    p = add_action(
        witness_actions,
        "add",
        "register a second officer as a witness (needs the SO PIN)",
        _witness_add,
        within="witness",
    )
    p.add_argument("name", help="the witness's name, as they will give it with --witness")
    p.add_argument(
        "--passphrase-file",
        metavar="FILE",
        type=Path,
        help=f"tests and automation: the new witness's passphrase (at least {MIN_PASSPHRASE} characters)"
        " from FILE; else the witness types it twice, without echo",
    )
    _officer_arguments(p)
    p = add_action(
        witness_actions,
        "list",
        "list the registered witnesses",
        _witness_list,
        mutating=False,
        within="witness",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add_action(
        witness_actions, "remove", "remove a witness (needs the SO PIN)", _witness_remove, within="witness"
    )
    p.add_argument("name", help="the witness to remove")
    _officer_arguments(p)


def _officer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--so-pin-file",
        metavar="FILE",
        type=Path,
        help="the token's SO PIN from FILE (else a prompt without echo)",
    )
    parser.add_argument(
        "--input-fd",
        metavar="FD",
        type=int,
        help="tests and automation: read the answers to the prompts (passphrases, SO PIN) line by line from"
        " this descriptor",
    )


@contextlib.contextmanager
def _controls(label: str, pin: str, module: str) -> Iterator[DualControl]:
    """The dual-control objects of token ``label``, logged in with the user PIN; closed afterwards."""
    holder = Pkcs11KeyHolder(label, pin, module)
    try:
        yield DualControl(KeyStore(holder))
    finally:
        holder.close()


def _changing(label: str, pin: str, module: str, entry: AuditEntry) -> DualControl:
    """The dual-control objects for the change itself: the token stays open until ``entry`` is
    written, anchored in it (iscl_hsm.keys.anchor); the entry closes it."""
    return DualControl(anchored_store(entry, label, pin, module))


def _authorise(
    args: argparse.Namespace,
    entry: AuditEntry,
    console: Console,
    why: str,
    check: Callable[[DualControl], None],
) -> tuple[str, str, str]:
    """Apply the witness gate and ``check``, then check the SO PIN, all before anything changes.

    Returns (token label, user PIN, SO PIN), to open the token again for the change.
    """
    label, pin = label_and_pin(args)
    entry.fields["token"] = label
    with _controls(label, pin, args.pkcs11_module) as controls:
        entry.fields["serial"] = controls.store.serial
        check_witness(args, controls.store, entry, console.secret)
        check(controls)
    # Closed: the SO cannot log in while this process is logged in as user.
    so_pin = ask_so_pin(args, console, label, why)
    verify_so_pin(args.pkcs11_module, label, so_pin)
    return label, pin, so_pin


def _policy_show(args: argparse.Namespace, entry: AuditEntry) -> int:
    with opened_store(args, entry) as store:
        entry.fields["serial"] = store.serial
        controls = DualControl(store)
        policy, count = controls.policy(), len(controls.witnesses())
    state = "on" if policy.dual_control else "off"
    entry.add_detail(f"dual control {state}")
    if args.json:
        shown = {"token": store.token_label, "serial": store.serial, **dataclasses.asdict(policy)}
        print(json.dumps({**shown, "witnesses": count}, indent=2))
        return 0
    text = f"token '{store.token_label}': dual control {state}"
    if policy.damaged:
        text += " (a policy record on the token is damaged, so it counts as on; set the policy again)"
    elif policy.set is None:
        text += " (never set)"
    else:
        text += f", set {policy.set} by {policy.officer}" + (
            f", witness {policy.witness}" if policy.witness else ""
        )
    print(text)
    print(f"{_witnesses(count)} registered (`iscl keys witness list`)")
    return 0


def _policy_set(args: argparse.Namespace, entry: AuditEntry) -> int:
    on = args.value == "on"
    entry.add_detail(f"dual control {args.value}")
    officer = entry.fields["officer"]

    def check(controls: DualControl) -> None:
        if on and not [w for w in controls.witnesses() if not same_name(w.name, officer or "")]:
            raise KeyHolderError(
                f"token '{controls.store.token_label}' has no witness other than you yet: register one first"
                " with `iscl keys witness add NAME`, or no ceremony could run under dual control",
                ErrorCode.BAD_OPTION,
            )

    label, pin, _ = _authorise(args, entry, Console(args), "to change the dual-control policy", check)
    controls = _changing(label, pin, args.pkcs11_module, entry)
    controls.set_policy(on, officer=officer, witness=entry.fields["witness"])
    print(
        f"token '{label}': dual control {args.value}"
        + (": every ceremony command now needs --witness NAME" if on else "")
    )
    return 0


def _witness_add(args: argparse.Namespace, entry: AuditEntry) -> int:
    name = check_name(args.name)
    entry.add_detail(f"witness {name}")
    console = Console(args)

    def check(controls: DualControl) -> None:
        if controls.find(name) is not None:
            raise KeyHolderError(
                f"witness '{name}' is already registered on token '{controls.store.token_label}'; remove"
                " it first to give them a new passphrase",
                ErrorCode.BAD_OPTION,
            )

    label, pin, so_pin = _authorise(args, entry, console, "to register a witness", check)
    passphrase = read_passphrase(
        args.passphrase_file, lambda: console.secret_twice(f"passphrase of the new witness '{name}' (hidden)")
    )
    if passphrase in (pin, so_pin):
        raise KeyHolderError(
            "a witness's passphrase must be their own secret, not a PIN of the token; nothing was changed",
            ErrorCode.BAD_OPTION,
        )
    controls = _changing(label, pin, args.pkcs11_module, entry)
    witness = controls.add_witness(name, passphrase, officer=entry.fields["officer"])
    print(f"witness '{witness.name}' registered on token '{label}'")
    return 0


def _witness_list(args: argparse.Namespace, entry: AuditEntry) -> int:
    with opened_store(args, entry) as store:
        entry.fields["serial"] = store.serial
        witnesses = DualControl(store).witnesses()
    entry.add_detail(_witnesses(len(witnesses)))
    if args.json:
        shown = [witness.as_dict() for witness in witnesses]
        print(json.dumps({"token": store.token_label, "serial": store.serial, "witnesses": shown}, indent=2))
        return 0
    print(f"token '{store.token_label}': {_witnesses(len(witnesses))}")
    if witnesses:
        print(f"{'NAME':24} {'ADDED':20} ADDED BY")
    for witness in witnesses:
        damaged = "  (damaged record: remove it and add the witness again)" if witness.stored is None else ""
        print(f"{witness.name:24} {witness.added or '-':20} {witness.officer or '-'}{damaged}")
    return 0


def _witnesses(count: int) -> str:
    return f"{count} witness" if count == 1 else f"{count} witnesses"


def _witness_remove(args: argparse.Namespace, entry: AuditEntry) -> int:
    name = args.name.strip()
    entry.add_detail(f"witness {name}")

    def check(controls: DualControl) -> None:
        witnesses = controls.witnesses()
        if not any(same_name(w.name, name) for w in witnesses):
            raise controls.unknown(name)
        if len(witnesses) == 1 and controls.policy().dual_control:
            raise KeyHolderError(
                f"witness '{name}' is the last one on token '{controls.store.token_label}', which requires dual"
                " control: add another witness first, or switch dual control off"
                " (`iscl keys policy set dual-control off`)",
                ErrorCode.BAD_OPTION,
            )

    label, pin, _ = _authorise(args, entry, Console(args), "to remove a witness", check)
    controls = _changing(label, pin, args.pkcs11_module, entry)
    removed = controls.remove_witness(name)
    print(f"witness '{removed.name}' removed from token '{label}'")
    return 0
