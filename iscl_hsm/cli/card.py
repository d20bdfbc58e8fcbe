"""`iscl card`: the virtual ISCL card and provisioning of ISCL cards (see docs/smart-cards.md).

Commands that talk to a card go through pcscd (:mod:`iscl_hsm.keyholder.smartcard`); ``init`` and
``emulate`` work on the virtual card's file. Key ceremonies reuse ``iscl keys``' prompts and the
component and KCV checks of :mod:`iscl_hsm.keys.components`; ``init``, ``load-key``, ``change-pin``
and ``unblock-pin`` append to the audit log of ``iscl keys`` (:mod:`iscl_hsm.keys.audit`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..cardsim.applet import IsclApplet
from ..cardsim.keys import CardKeys, FileKeys, TokenKeys
from ..cardsim.state import DEFAULT_TRIES, CardState
from ..cardsim.vpcd import DEFAULT_PORT, VpcdCard
from ..errors import ErrorCode, KeyHolderError
from ..keyholder import apdu
from ..keyholder.apdu import Ins, Pin, Sw
from ..keyholder.base import KEY_INDEXES
from ..keyholder.pkcs11 import Pkcs11KeyHolder
from ..keys.components import algorithm_for, kcv_of
from .audited import AuditEntry, add_audit_arguments, audited
from .ceremony import Console, collect_components, read_secret_file
from .keys import add_component_arguments, component_count
from .options import (
    add_key_holder_options,
    add_reader_arguments,
    card_holder_module,
    open_card_holder,
    open_key_holder,
    reader_description,
)

if TYPE_CHECKING:
    from ..keyholder.smartcard import CardChannel

VIRTUAL_WARNING = (
    "The virtual card is for tests, demos and practising ceremonies, never for patient data: its file"
    " holds its PINs, and its keys in clear unless they stay in a token (--token)."
)


def _channel(args: argparse.Namespace) -> CardChannel:
    channel: CardChannel = card_holder_module().CardChannel(args.reader, args.wait_card)
    return channel


# --------------------------------------------------------------------------------------------------
# Options


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    card = sub.add_parser(
        "card",
        help="ISCL IC cards: a virtual card, loading keys, PINs",
        description="Provision ISCL IC cards through PC/SC, and run a virtual ISCL card for tests and"
        " demos. Links use a card with 'iscl server/client --reader NAME' (or --card)."
        " See `iscl docs smart-cards`.",
    )
    actions = card.add_subparsers(title="actions", metavar="ACTION", required=True)

    p = _action(actions, "init", "create a virtual card file with its two PINs", _audited("init", _init),
                "Write a new virtual card file (keys none yet, both PINs, retry counters). " + VIRTUAL_WARNING,
                "iscl card init --card-file card.json --pin-file user.pin --so-pin-file so.pin --officer 'A. Sato'")
    p.add_argument("--card-file", metavar="FILE", type=Path, required=True, help="the new card file (mode 0600)")
    p.add_argument("--pin-file", metavar="FILE", type=Path, help="the card-holder PIN (else a prompt, twice)")
    p.add_argument("--so-pin-file", metavar="FILE", type=Path,
                   help="the security-officer PIN (else a prompt, twice)")
    p.add_argument("--max-tries", type=int, default=DEFAULT_TRIES,
                   help="wrong entries before a PIN blocks (default: %(default)s)")
    add_audit_arguments(p, officer_required=True)

    p = _action(actions, "emulate", "insert a virtual ISCL card into the vsmartcard reader", _emulate,
                "Plug a virtual ISCL card into vsmartcard's virtual reader of pcscd and answer its APDUs"
                " until pcscd stops (or Ctrl-C). Port 35963 is reader 'Virtual PCD 00 00', 35964 is"
                " 'Virtual PCD 00 01'. PINs, retry counters and keys persist in --card-file; with --token"
                " the keys stay in that PKCS#11 token instead (load them with 'iscl keys') and the token"
                " does the card's DES work. " + VIRTUAL_WARNING,
                "iscl card emulate --port 35963 --card-file card.json &\n"
                "  iscl card emulate --port 35964 --card-file pins-only.json --token hospital-a --pin-file a.pin &")
    p.add_argument("--card-file", "--key-file", dest="card_file", metavar="FILE", type=Path, required=True,
                   help="the card's file ('iscl card init'); --key-file is another name for it")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="vpcd's port (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="vpcd's address (default: %(default)s)")
    _token_options(p)

    p = _action(actions, "load-key", "load a key onto a card from 2 or 3 custodian components",
                _audited("load-key", _load_key),
                "Enter a key as custodian components with their KCVs, exactly as 'iscl keys"
                " import-components' does, and store it in the card's slot (PUT KEY, which needs the"
                " security-officer PIN). The card answers with the KCV of what it stored, which must"
                " match. An existing key in the slot is replaced. A virtual card on a token refuses"
                " keys before the ceremony starts: load them into the token with 'iscl keys'.",
                "iscl card load-key --reader 'PCD 00 00' --purpose auth --index 1 --components 2 --officer 'A. Sato'")
    _card_arguments(p)
    p.add_argument("--purpose", required=True, choices=("auth", "enc"), help="authentication or encryption key")
    p.add_argument("--index", type=int, required=True, choices=KEY_INDEXES, help="key index 1..8")
    p.add_argument("--algorithm", help="des (default), des2 or des3")
    p.add_argument("--so-pin-file", metavar="FILE", type=Path, help="the security-officer PIN (else a prompt)")
    add_component_arguments(p, reading=True)
    add_audit_arguments(p, officer_required=True)

    p = _action(actions, "change-pin", "change the card-holder PIN (or with --so the security officer's)",
                _audited("change-pin", _change_pin, officer_required=False),
                "Change a PIN of the card (CHANGE REFERENCE DATA).",
                "iscl card change-pin --reader 'PCD 00 00'")
    _card_arguments(p)
    p.add_argument("--so", action="store_true", help="change the security-officer PIN")
    p.add_argument("--pin-file", metavar="FILE", type=Path, help="the current PIN (else a prompt)")
    p.add_argument("--new-pin-file", metavar="FILE", type=Path, help="the new PIN (else a prompt, twice)")
    p.add_argument("--input-fd", metavar="FD", type=int, help="read the prompts' answers from this descriptor")
    add_audit_arguments(p, officer_required=False)

    p = _action(actions, "unblock-pin", "set a new card-holder PIN with the security-officer PIN",
                _audited("unblock-pin", _unblock_pin),
                "Reset the card-holder PIN's retry counter and set a new PIN (RESET RETRY COUNTER).",
                "iscl card unblock-pin --reader 'PCD 00 00' --officer 'A. Sato'")
    _card_arguments(p)
    p.add_argument("--so-pin-file", metavar="FILE", type=Path, help="the security-officer PIN (else a prompt)")
    p.add_argument("--new-pin-file", metavar="FILE", type=Path, help="the new PIN (else a prompt, twice)")
    p.add_argument("--input-fd", metavar="FD", type=int, help="read the prompts' answers from this descriptor")
    add_audit_arguments(p, officer_required=True)

    p = _action(actions, "list", "show the card's key slots and their KCVs", _list,
                "Show which key slots hold a key, with its check value (INTERNAL AUTHENTICATE of zeros;"
                " needs the card-holder PIN).",
                "iscl card list --reader 'PCD 00 00' --pin-file user.pin")
    _card_arguments(p)
    p.add_argument("--pin-file", metavar="FILE", type=Path, help="the card-holder PIN; else $ISCL_PIN or a prompt")


def _action(actions: argparse._SubParsersAction, name: str, text: str, run: object,  # type: ignore[type-arg]
            description: str, example: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = actions.add_parser(
        name, help=text, description=f"{description}\n\nExample:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(run=run)
    return parser


def _card_arguments(parser: argparse.ArgumentParser) -> None:
    add_reader_arguments(parser.add_argument_group("card", "Without --reader: the first reader holding a card."))


def _token_options(parser: argparse.ArgumentParser) -> None:
    """The shared --pkcs11-module/--token/--pin-file, with what they mean for a virtual card."""
    add_key_holder_options(
        parser,
        record_keys=False,
        description="Without --token the keys are in --card-file. With --token they stay in the token,"
        " opened with --pin-file, else $ISCL_PIN, else a prompt.",
        token_help="keep the card's keys in this token (default: in --card-file)",
    )


# --------------------------------------------------------------------------------------------------
# Audit: the log of `iscl keys`, verified by `iscl keys audit verify`

def _audited(name: str, run: Callable[[argparse.Namespace, AuditEntry], int],
             officer_required: bool = True) -> Callable[[argparse.Namespace], int]:  # fmt: skip
    """An `iscl card` command, audited like `iscl keys` (same log, same verification)."""
    return audited(f"card {name}", f"card {name}", _card_named, run,
                   changes="the card" if officer_required else None)  # fmt: skip


def _card_named(args: argparse.Namespace) -> str:
    """The card as the options name it, until the command has opened it."""
    if getattr(args, "card_file", None) is not None:
        return f"virtual card file {args.card_file}"
    return f"card in {reader_description(args)}"


# --------------------------------------------------------------------------------------------------
# Actions


def _init(args: argparse.Namespace, entry: AuditEntry) -> int:
    console = Console(args)
    user_pin = _pin(args.pin_file, console, "new card-holder PIN", twice=True)
    so_pin = _pin(args.so_pin_file, console, "new security-officer PIN", twice=True)
    if user_pin == so_pin:
        raise KeyHolderError("the card-holder PIN and the security-officer PIN must differ", ErrorCode.BAD_OPTION)
    if not 1 <= args.max_tries <= 15:
        raise KeyHolderError("--max-tries must be 1..15", ErrorCode.BAD_OPTION)
    try:
        state = CardState.new(user_pin, so_pin, args.max_tries)
    except ValueError as exc:
        raise KeyHolderError(f"{exc}", ErrorCode.BAD_OPTION) from None
    state.create(args.card_file)
    entry.fields["detail"] = f"card-holder and security-officer PINs set, {args.max_tries} tries each"
    print(f"virtual card written to {args.card_file}; insert it with 'iscl card emulate --card-file"
          f" {args.card_file}', then load keys with 'iscl card load-key'")
    return 0


def _emulate(args: argparse.Namespace) -> int:
    if args.token is None and args.pin_file is not None:
        raise KeyHolderError(
            "--pin-file opens the token of --token; the virtual card's own PINs are in its card file",
            ErrorCode.BAD_OPTION,
        )
    state = CardState.load(args.card_file)
    with contextlib.ExitStack() as stack:
        keys: CardKeys = FileKeys(state)
        if args.token is not None:
            keys = TokenKeys(stack.enter_context(_open_token(args, state)))
        card = VpcdCard(IsclApplet(state, keys), args.host, args.port)
        card.connect()
        stack.callback(card.close)
        print(f"iscl card: virtual ISCL card ({args.card_file}, keys in {keys.description}) inserted into the"
              f" vpcd reader on port {args.port}; Ctrl-C removes it", file=sys.stderr, flush=True)
        try:
            card.run()
        except KeyboardInterrupt:
            return 0
    print("iscl card: the reader closed the connection (pcscd stopped); the card is out", file=sys.stderr)
    return 0


def _open_token(args: argparse.Namespace, state: CardState) -> Pkcs11KeyHolder:
    """The token that keeps the card's keys; a card file that holds keys of its own is refused."""
    if state.keys:
        raise KeyHolderError(
            f"the virtual card file {args.card_file} holds keys, but with --token the card's keys stay in"
            f" token '{args.token}': give a card file without keys (iscl card init)",
            ErrorCode.BAD_OPTION,
        )
    holder = open_key_holder(args)
    assert isinstance(holder, Pkcs11KeyHolder)  # emulate has no --reader/--card
    return holder


def _load_key(args: argparse.Namespace, entry: AuditEntry) -> int:
    algorithm = algorithm_for(args.purpose, args.algorithm)
    count = component_count(args.components)
    if args.component_file and len(args.component_file) != count:
        raise KeyHolderError(f"give --component-file once per component: {count} times, not"
                             f" {len(args.component_file)}", ErrorCode.BAD_OPTION)
    console = Console(args)
    with _channel(args) as channel:
        entry.fields["token"] = channel.description
        _check_loads_keys(channel, args.purpose, args.index)
        channel.verify_pin(_pin(args.so_pin_file, console, f"security-officer PIN of the {channel.description}"),
                           Pin.SO)  # a wrong SO PIN fails before any custodian types
        value = collect_components(console, args.component_file, args.fix_parity, args.purpose, args.index,
                                    algorithm, count)
        expected = kcv_of(algorithm, value)
        entry.fields.update(kcv=expected.hex().upper(), detail=algorithm.name)
        print(f"key KCV: {expected.hex().upper()}", flush=True)
        command = apdu.command(Ins.PUT_KEY, 0, apdu.key_reference(args.purpose, args.index), value)
        del value
        stored = channel.check(command, f"PUT KEY of {args.purpose} key {args.index}", apdu.KCV_LENGTH)
        if stored != expected:
            raise KeyHolderError(
                f"the {channel.description} reports KCV {stored.hex().upper()} for {args.purpose} key {args.index},"
                f" not {expected.hex().upper()}: the key was damaged on the way; load it again"
            )
        print(f"stored {args.purpose} key {args.index} ({algorithm.name}) on the {channel.description},"
              f" KCV {stored.hex().upper()} (confirmed by the card)")
    return 0


def _check_loads_keys(channel: CardChannel, purpose: str, index: int) -> None:
    """An empty PUT KEY: a card that takes no keys (a virtual card on a token) answers 6A81 to it.

    Any other answer (6700 from a card that does take keys) lets the ceremony go on.
    """
    command = apdu.command(Ins.PUT_KEY, 0, apdu.key_reference(purpose, index))
    _, sw = channel.transmit(command, "PUT KEY (does the card load keys?)")
    if sw == Sw.FUNCTION_NOT_SUPPORTED:
        raise channel.status_error(sw, "PUT KEY", command)


def _change_pin(args: argparse.Namespace, entry: AuditEntry) -> int:
    reference = Pin.SO if args.so else Pin.USER
    console = Console(args)
    name = apdu.PIN_NAMES[reference]
    entry.fields["detail"] = name
    with _channel(args) as channel:
        entry.fields["token"] = channel.description
        old = _pin(args.pin_file, console, f"current {name}")
        new = _pin(args.new_pin_file, console, f"new {name}", twice=True)
        data = _pin_blocks(old, new, name)
        channel.check(apdu.command(Ins.CHANGE_REFERENCE_DATA, 0, reference, data), f"CHANGE REFERENCE DATA of the {name}")
        print(f"the {name} of the {channel.description} was changed")
    return 0


def _unblock_pin(args: argparse.Namespace, entry: AuditEntry) -> int:
    console = Console(args)
    entry.fields["detail"] = "card-holder PIN set and unblocked"
    with _channel(args) as channel:
        entry.fields["token"] = channel.description
        so_pin = _pin(args.so_pin_file, console, "security-officer PIN")
        new = _pin(args.new_pin_file, console, "new card-holder PIN", twice=True)
        data = _pin_blocks(so_pin, new, "card-holder PIN")
        channel.check(apdu.command(Ins.RESET_RETRY_COUNTER, 0, Pin.USER, data), "RESET RETRY COUNTER")
        print(f"the card-holder PIN of the {channel.description} was set and unblocked")
    return 0


def _list(args: argparse.Namespace) -> int:
    with open_card_holder(args) as holder:
        for purpose in ("auth", "enc"):
            for index in KEY_INDEXES:
                command = apdu.command(Ins.INTERNAL_AUTHENTICATE, 0, apdu.key_reference(purpose, index),
                                       bytes(apdu.BLOCK), le=apdu.BLOCK)
                data, sw = holder.channel.transmit(command, f"INTERNAL AUTHENTICATE with {purpose} key {index}")
                if sw == Sw.OK:
                    print(f"{purpose}-{index}  KCV {data[:3].hex().upper()}")
                elif sw != Sw.REFERENCE_NOT_FOUND:
                    raise holder.channel.status_error(sw, "INTERNAL AUTHENTICATE", command)
    return 0


def _pin(path: Path | None, console: Console, what: str, *, twice: bool = False) -> str:
    if path is not None:
        return read_secret_file(path, what)
    return console.secret_twice(what) if twice else console.secret(f"{what}: ")


def _pin_blocks(first: str, second: str, name: str) -> bytes:
    try:
        return apdu.pin_block(first) + apdu.pin_block(second)
    except ValueError as exc:
        raise KeyHolderError(f"the {name}: {exc}", ErrorCode.BAD_OPTION) from None
