"""The option group every command shares: which key holder, which keys, which algorithms."""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import importlib
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import wire
from ..engine import Config, Md5Order, Profile, check_key_holder
from ..errors import ErrorCode, IsclError, KeyHolderConfigError, KeyHolderError
from ..keyholder.base import KEY_INDEXES, KeyHolder
from ..keyholder.pkcs11 import DEFAULT_MODULE, Pkcs11KeyHolder
from ..keyholder.provision import DEMO_LABEL, default_data_dir, ensure_demo_token
from ..transport.common import DEFAULT_TIMEOUTS, Timeouts
from ..wire import Encryption, Mac
from .extras import CARD, Extra, import_for

if TYPE_CHECKING:
    from ..keyholder.smartcard import SmartCardKeyHolder

ENCRYPTIONS = {"none": Encryption.NONE, "des-cbc": Encryption.DES_CBC}
MACS = {"none": Mac.NONE, "md5": Mac.MD5, "des-mac": Mac.DES_MAC}
PROFILES = {p.value: p for p in Profile}
MD5_ORDERS = {o.value: o for o in Md5Order}
ENCRYPTION_NAMES = {v: k for k, v in ENCRYPTIONS.items()}
MAC_NAMES = {v: k for k, v in MACS.items()}


def deferred(module: str, name: str, extra: Extra | None = None) -> Callable[[argparse.Namespace], int]:
    """A command's run function ``module.name``, imported only when the command runs: each command pays
    for its own imports (pynetdicom and pydicom take half a second), not for every other command's, and a
    command whose ``extra`` is not installed says so in one line (the others still run)."""

    def run(args: argparse.Namespace) -> int:
        home = importlib.import_module(module) if extra is None else import_for(module, extra)
        command: Callable[[argparse.Namespace], int] = getattr(home, name)
        return command(args)

    return run


def _key_index(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 8:
        raise argparse.ArgumentTypeError(f"{text} is not a key index 1..8")
    return value


def _enc_key(text: str) -> int:
    return wire.SESSION_KEYS if text == "session" else _key_index(text)


def _block(text: str) -> int:
    value = int(text)
    if not (wire.MIN_BLOCK <= value <= wire.MAX_BLOCK and value % 8 == 0):
        raise argparse.ArgumentTypeError(f"{text} is not a multiple of 8 between 8 and {wire.MAX_BLOCK}")
    return value


def add_key_holder_options(
    parser: argparse.ArgumentParser,
    *,
    record_keys: bool = True,
    description: str | None = None,
    token_help: str = "token label (default: the demo token)",
) -> None:
    """--pkcs11-module, --token, --pin-file; for commands that run links, --record-keys and --reader etc.

    ``description`` and ``token_help`` reword the group for a command whose keys live elsewhere
    without --token (the virtual card).
    """
    group = parser.add_argument_group(
        "key holder",
        description
        or "Where the keys live. Without --token, the demo SoftHSM2 token under"
        f" {default_data_dir()} is used (created on first use).",
    )
    group.add_argument("--pkcs11-module", metavar="PATH", default=DEFAULT_MODULE,
                       help="PKCS#11 module (default: %(default)s)")
    group.add_argument("--token", metavar="LABEL", help=token_help)
    group.add_argument("--pin-file", metavar="FILE", type=Path,
                       help="file holding the user PIN; else $ISCL_PIN; else a prompt")
    if not record_keys:
        return
    group.add_argument("--record-keys", choices=("host", "token"), default="host",
                       help="where the DES keys that protect messages are used: 'host' (OpenSSL, fast:"
                       " derived keys, and V1.00's encryption key N where its policy lets the host read it,"
                       " else inside the token) or 'token' (never leave the token, slower) (default: %(default)s)")
    add_reader_arguments(group)


def add_reader_arguments(group: argparse._ArgumentGroup) -> None:
    """--reader, --card and --wait-card: which IC card to use (shared with the link commands)."""
    group.add_argument("--reader", metavar="NAME",
                       help="use the ISCL IC card in this PC/SC reader (its exact name or a unique part of"
                       " it, e.g. 'PCD 00 01') instead of a PKCS#11 token")
    group.add_argument("--card", action="store_true",
                       help="use the ISCL IC card in the first reader that holds a card")
    group.add_argument("--wait-card", metavar="SECONDS", type=float, default=0.0,
                       help="wait up to SECONDS for the card to be inserted (default: do not wait)")


def wants_card(args: argparse.Namespace) -> bool:
    """True when --reader or --card chose an IC card instead of a PKCS#11 token."""
    return bool(getattr(args, "card", False) or getattr(args, "reader", None) is not None)


def open_card_holder(args: argparse.Namespace) -> SmartCardKeyHolder:
    """The card key holder the options name; the card-holder PIN from --pin-file, $ISCL_PIN or a prompt."""
    if getattr(args, "token", None) is not None:
        raise KeyHolderError("give --token or --reader/--card, not both", ErrorCode.BAD_OPTION)
    if getattr(args, "record_keys", "host") != "host":
        raise KeyHolderError(
            "record keys derived by an IC card always live on the host: drop --record-keys token",
            ErrorCode.BAD_OPTION,
        )
    smartcard = card_holder_module()  # before the PIN prompt: without pyscard, no PIN is asked for
    pin = read_pin(args.pin_file, f"card in {reader_description(args)}")
    holder: SmartCardKeyHolder = smartcard.SmartCardKeyHolder(pin, args.reader, args.wait_card)
    return holder


def card_holder_module() -> Any:
    """The smart-card key holder module, which needs pyscard (the ``card`` extra)."""
    return import_for("iscl_hsm.keyholder.smartcard", CARD)


def reader_description(args: argparse.Namespace) -> str:
    return f"reader '{args.reader}'" if args.reader else "the first reader holding a card"


def add_link_options(parser: argparse.ArgumentParser) -> None:
    """The key-holder options plus key ids, algorithms and limits."""
    add_key_holder_options(parser)
    group = parser.add_argument_group("link", "Both ends must use the same profile, algorithms and key ids.")
    group.add_argument("--profile", choices=PROFILES, default=Profile.V100.value,
                       help="wire profile: 'v1.00' follows the published ISCL V1.00 wire, to talk to equipment"
                       " that speaks it; 'hardened' adds this project's protections (handshake MACs, keys per"
                       " link and direction, sequence numbers), which both ends must choose (default:"
                       " %(default)s; `iscl docs protocol`, \"Profiles\")")
    group.add_argument("--auth-key-id", metavar="N", type=_key_index, default=1,
                       help="authentication key pair 1..8 the client asks for (default: %(default)s);"
                       " a server takes the client's choice, within --allow-key-id")
    group.add_argument("--allow-key-id", metavar="N", type=_key_index, action="append",
                       help="server: accept only this authentication key pair (repeat for several;"
                       " default: all of 1..8)")
    group.add_argument("--enc-key-id", metavar="N|session", type=_enc_key, default=1,
                       help="encryption key 1..8, or 'session' for a fresh key per message (default: 1). In"
                       " v1.00 key N is itself the DES key, so an IC card (which never gives a key out) needs"
                       " 'session'")
    group.add_argument("--encryption", choices=ENCRYPTIONS, default="des-cbc",
                       help="data encryption (default: %(default)s)")
    group.add_argument("--mac", choices=MACS, default="des-mac", help="message MAC (default: %(default)s)")
    group.add_argument("--max-block", metavar="BYTES", type=_block, default=wire.MAX_BLOCK,
                       help="largest communication block (default: %(default)s)")
    group.add_argument("--max-message", metavar="BYTES", type=int, default=wire.DEFAULT_MAX_MESSAGE,
                       help="largest message accepted or sent (default: %(default)s)")
    group.add_argument("--auth-data", metavar="TEXT",
                       help="up to 128 bytes shown to the peer during authentication (default: none in v1.00,"
                       " which then sends the SDK's bare messages; 'iscl-hsm' in hardened, which needs 1..128)")
    group.add_argument("--md5-order", choices=MD5_ORDERS, default=Md5Order.ENCRYPT_OUTPUT.value,
                       help="v1.00, --mac md5: 'encrypt-output' sends E(MD5(message)) as the SDK does,"
                       " 'encrypt-random' MD5(message || E(random number)); a receiver checks either, as"
                       " DICOM PS3.15 asks (default: %(default)s)")
    group.add_argument("--allow-unkeyed-md5", action="store_true",
                       help="v1.00 with --encryption none --mac md5: send and accept the plain MD5 the SDK"
                       " sends there, which anyone on the path can recompute after changing a message")


TIMEOUT_HELP = {
    "handshake": "the whole handshake",
    "answer": "the peer's answer to a message request",
    "message": "the next block or MAC of a message the peer is sending, or the peer taking our data",
    "close": "the answer to a line disconnection request",
    "idle": "anything at all, when nothing is owed either way",
}


def seconds(text: str) -> float:
    """A number of seconds, 0 or more (argparse type)."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds (0 or more)")
    return value


def add_timeout_options(parser: argparse.ArgumentParser, *, idle: bool = True) -> None:
    """--handshake-timeout, --answer-timeout, --message-timeout, --close-timeout (and --idle-timeout)."""
    group = parser.add_argument_group(
        "timeouts", "Seconds this end waits for the peer before it drops the link (0: for ever)."
    )
    for name, waits_for in TIMEOUT_HELP.items():
        if name != "idle" or idle:
            default = getattr(DEFAULT_TIMEOUTS, name)
            group.add_argument(f"--{name}-timeout", metavar="SECONDS", type=seconds, default=default,
                               help=f"{waits_for} (default: %(default)g)")


def build_timeouts(args: argparse.Namespace) -> Timeouts:
    """The timeouts the options name (0 means none); options a command lacks keep their defaults."""
    given = {f.name: getattr(args, f"{f.name}_timeout", None) for f in dataclasses.fields(Timeouts)}
    return dataclasses.replace(DEFAULT_TIMEOUTS, **{name: value or None for name, value in given.items() if value is not None})


def build_config(args: argparse.Namespace) -> Config:
    """The link settings the options name; a value the protocol cannot take is one clear error."""
    try:
        return _config(args)
    except ValueError as exc:
        raise IsclError(ErrorCode.BAD_OPTION, f"{exc}; see --help") from None


def _config(args: argparse.Namespace) -> Config:
    return Config(
        profile=PROFILES[args.profile],
        md5_order=MD5_ORDERS[args.md5_order],
        allow_unkeyed_md5=args.allow_unkeyed_md5,
        allowed_auth_key_ids=frozenset(args.allow_key_id or KEY_INDEXES),
        auth_key_id=args.auth_key_id,
        enc_key_id=args.enc_key_id,
        encryption=ENCRYPTIONS[args.encryption],
        mac=MACS[args.mac],
        max_block=args.max_block,
        max_message=args.max_message,
        auth_data=None if args.auth_data is None else args.auth_data.encode(),
    )


def read_pin(pin_file: Path | None, holder: str) -> str:
    """The PIN of ``holder`` ("token 'X'", "card in reader 'Y'") from a file, $ISCL_PIN or a prompt.

    Never echoed, never logged.
    """
    if pin_file is not None:
        try:
            return pin_file.read_text().strip()
        except OSError as exc:
            raise KeyHolderConfigError(f"cannot read the PIN file {pin_file}: {exc.strerror}") from None
    if pin := os.environ.get("ISCL_PIN"):
        return pin
    if not sys.stdin.isatty():
        raise KeyHolderConfigError(
            f"no PIN for {holder}: pass --pin-file FILE or set ISCL_PIN (stdin is not a terminal)"
        )
    return getpass.getpass(f"PIN for {holder}: ")


def open_key_holder(args: argparse.Namespace) -> KeyHolder:
    """The PKCS#11 key holder the options name (the demo token when none is named), or an IC card."""
    if wants_card(args):
        return open_card_holder(args)
    if args.token is None:
        label, pin_path = ensure_demo_token()
        pin_file = args.pin_file or pin_path
    else:
        label, pin_file = args.token, args.pin_file
    pin = read_pin(pin_file, f"token '{label}'")
    return Pkcs11KeyHolder(label, pin, args.pkcs11_module, record_keys=getattr(args, "record_keys", "host"))


def open_link_holder(args: argparse.Namespace, config: Config) -> KeyHolder:
    """The key holder the options name, checked to serve links of ``config`` before any link is made."""
    holder = open_key_holder(args)
    try:
        check_key_holder(config, holder)
    except BaseException:
        holder.close()
        raise
    return holder


def describe(parameters: object) -> str:
    """One line for stderr: the link's parameters."""
    from ..engine import LinkParameters

    assert isinstance(parameters, LinkParameters)
    key = "session keys" if parameters.enc_key_id == wire.SESSION_KEYS else f"key {parameters.enc_key_id}"
    peer = parameters.peer_auth_data.decode("utf-8", "replace")
    return (
        f"ISCL link up: {parameters.version}, {parameters.profile.value} profile, block {parameters.block_length}"
        f" bytes, auth key {parameters.auth_key_id}, {ENCRYPTION_NAMES[parameters.encryption]} +"
        f" {MAC_NAMES[parameters.mac]} with {key}, " + (f"peer auth data {peer!r}" if peer else "no peer auth data")
    )


__all__ = ["DEMO_LABEL", "add_key_holder_options", "add_link_options", "add_timeout_options", "build_config",
           "build_timeouts", "describe", "open_key_holder", "open_link_holder", "read_pin", "seconds"]
