"""`iscl tunnel client|server`: the ISCL gateway in front of unmodified DICOM applications.

Every option can also come from a TOML file (``--config FILE``) under its long name without the
dashes (``max-message = 1048576``); options on the command line override the file.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import service, wire
from ..dicom.gateway import (
    DEFAULT_CHUNK,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    Address,
    Mode,
    Tunnel,
    TunnelSettings,
)
from .options import (
    add_link_options,
    add_timeout_options,
    build_config,
    build_timeouts,
    open_link_holder,
    seconds,
)

_UNSET: Any = object()
"""Marks an option the command line did not give (so the config file or the default applies)."""

_NOT_IN_FILE = {"help", "config"}
_DRAIN_TIMEOUT = 30.0

_EXAMPLE_CONFIG = """\
  # /etc/iscl/tunnel-server.toml
  listen = "0.0.0.0:2761"
  forward = "127.0.0.1:11112"
  token = "hospital-a"
  pin-file = "/etc/iscl/hospital-a.pin"
  allow-key-id = [1, 2]
  profile = "v1.00"
  encryption = "des-cbc"
  mac = "des-mac"
"""


class _ConfigFileParser(argparse.ArgumentParser):
    """An argument parser that fills the options the command line left out from ``--config FILE``."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        namespace = namespace or argparse.Namespace()
        for action in self._file_options():
            if not hasattr(namespace, action.dest):
                setattr(namespace, action.dest, None if _is_list(action) else _UNSET)
        parsed, extras = super().parse_known_args(args, namespace)
        settings = _read_config_file(parsed.config, self) if parsed.config is not None else {}
        for action in self._file_options():
            if getattr(parsed, action.dest) in (_UNSET, None):
                setattr(parsed, action.dest, settings.get(action.dest, _default(action)))
        if getattr(parsed, parsed.target_option) is None:
            self.error(f"--{parsed.target_option} HOST:PORT is required (or '{parsed.target_option}' in the"
                       " --config file)")
        return parsed, extras

    def _file_options(self) -> list[argparse.Action]:
        return [a for a in self._actions if a.option_strings and a.dest not in _NOT_IN_FILE]


def _is_list(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction)


def _default(action: argparse.Action) -> Any:
    """The option's default, converted as argparse converts string defaults."""
    if isinstance(action.default, str) and callable(action.type):
        return action.type(action.default)
    return action.default


def _read_config_file(path: Path, parser: _ConfigFileParser) -> dict[str, Any]:
    """The file's settings by option dest; an unknown key or a bad value is a usage error naming both."""
    try:
        with path.open("rb") as file:
            table = tomllib.load(file)
    except OSError as exc:
        parser.error(f"cannot read the config file {path}: {exc.strerror}")
    except tomllib.TOMLDecodeError as exc:
        parser.error(f"the config file {path} is not valid TOML: {exc}")
    options = {a.option_strings[-1].removeprefix("--"): a for a in parser._file_options()}
    settings = {}
    for key, value in table.items():
        action = options.get(key)
        if action is None:
            parser.error(
                f"the config file {path} has an unknown key '{key}'; the keys are the long options"
                f" without '--': {', '.join(options)}"
            )
        try:
            if _is_list(action):
                values = value if isinstance(value, list) else [value]
                settings[action.dest] = [_convert(action, item) for item in values]
            else:
                settings[action.dest] = _convert(action, value)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            parser.error(f"the config file {path}, key '{key}': {exc}")
    return settings


def _convert(action: argparse.Action, value: Any) -> Any:
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise TypeError(f"{value!r} is not true or false")
        return value
    if isinstance(value, dict | list | bool):
        raise TypeError(f"{value!r} is not a single string or number")
    text = str(value)
    result = action.type(text) if callable(action.type) else text
    if action.choices is not None and result not in action.choices:
        raise ValueError(f"{value!r} is not one of {', '.join(map(str, action.choices))}")
    return result


def _address(text: str) -> Address:
    try:
        return Address.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(kind: type[int | float]) -> Any:
    def convert(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not a positive number")
        return value

    convert.__name__ = kind.__name__
    return convert


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    tunnel = sub.add_parser(
        "tunnel",
        help="ISCL gateway in front of unmodified DICOM applications (like stunnel)",
        description="Put ISCL in front of DICOM applications that know nothing of it. A client tunnel"
        " accepts plain DICOM from local applications and carries each connection over its own ISCL"
        " link; a server tunnel accepts ISCL links and forwards each one, in plain, to the local"
        " application it guards. One log line per link when it ends (see docs/gateway.md).",
    )
    modes = tunnel.add_subparsers(title="modes", metavar="MODE", required=True, parser_class=_ConfigFileParser)
    client = modes.add_parser(
        "client",
        help="accept plain DICOM locally and carry it over ISCL",
        description="Accept plain TCP (DICOM) from local applications; for each connection, open an ISCL"
        " link to --connect and relay both ways. Example (a modality sends to 127.0.0.1:11112):\n"
        "  iscl tunnel client --listen 127.0.0.1:11112 --connect pacs.example.org:2761 \\\n"
        "      --token hospital-a --pin-file /etc/iscl/hospital-a.pin",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    client.add_argument("--listen", metavar="HOST:PORT", type=_address, default="127.0.0.1:11112",
                        help="where local applications connect (default: %(default)s)")
    client.add_argument("--connect", metavar="HOST:PORT", type=_address,
                        help=f"the server tunnel (its port is usually {wire.DEFAULT_PORT}); required")
    client.set_defaults(run=run_tunnel, mode=Mode.CLIENT, target_option="connect")

    server = modes.add_parser(
        "server",
        help="accept ISCL links and forward plain DICOM to a local application",
        description="Accept ISCL links; for each authenticated link, open a plain TCP connection to"
        " --forward and relay both ways. Restrict the peers' authentication keys with --allow-key-id."
        " Example (a PACS listens on 127.0.0.1:104):\n"
        f"  iscl tunnel server --listen 0.0.0.0:{wire.DEFAULT_PORT} --forward 127.0.0.1:104 \\\n"
        "      --token hospital-a --pin-file /etc/iscl/hospital-a.pin --allow-key-id 1\n\n"
        f"A config file instead of flags (--config FILE):\n{_EXAMPLE_CONFIG}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    server.add_argument("--listen", metavar="HOST:PORT", type=_address, default=f"0.0.0.0:{wire.DEFAULT_PORT}",
                        help="where client tunnels connect (default: %(default)s)")
    server.add_argument("--forward", metavar="HOST:PORT", type=_address,
                        help="the DICOM application links are forwarded to; required")
    server.set_defaults(run=run_tunnel, mode=Mode.SERVER, target_option="forward")

    for parser in (client, server):
        parser.add_argument("--config", metavar="FILE", type=Path,
                            help="TOML file with any of these options under their long names without"
                            " '--'; options given here override it")
        _add_gateway_options(parser)
        add_link_options(parser)
        add_timeout_options(parser, idle=False)  # (the gateway's --idle-timeout counts data both ways)


def _add_gateway_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("gateway")
    group.add_argument("--chunk-size", metavar="BYTES", type=_positive(int), default=DEFAULT_CHUNK,
                       help="largest plain read carried as one ISCL message, capped by --max-message"
                       " (default: %(default)s)")
    group.add_argument("--drain-timeout", metavar="SECONDS", type=_positive(float), default=_DRAIN_TIMEOUT,
                       help="on SIGTERM or SIGINT, how long open links may run on before they are aborted"
                       " (default: %(default)s)")
    group.add_argument("--connect-timeout", metavar="SECONDS", type=_positive(float), default=DEFAULT_CONNECT_TIMEOUT,
                       help="how long opening the outgoing connection (and, for a client, authenticating)"
                       " may take (default: %(default)s)")
    group.add_argument("--idle-timeout", metavar="SECONDS", type=seconds, default=DEFAULT_IDLE_TIMEOUT,
                       help="abort a link (the application sees its association aborted) after this long"
                       " without data either way; 0: never (default: %(default)g, 12 hours)")


def run_tunnel(args: argparse.Namespace) -> int:
    target = getattr(args, args.target_option)
    config = build_config(args)  # option errors before any token is touched
    gateway_log = logging.getLogger("iscl_hsm.dicom.gateway")
    if not gateway_log.isEnabledFor(logging.INFO):
        gateway_log.setLevel(logging.INFO)  # the per-link lines are the gateway's output
    holder = open_link_holder(args, config)
    settings = TunnelSettings(
        mode=args.mode, listen=args.listen, target=target, key_holder=holder, config=config,
        chunk_size=args.chunk_size, connect_timeout=args.connect_timeout, idle_timeout=args.idle_timeout or None,
        timeouts=dataclasses.replace(build_timeouts(args), idle=None),
    )  # fmt: skip
    try:
        return asyncio.run(_serve(settings, args.drain_timeout))
    finally:
        holder.close()


async def _serve(settings: TunnelSettings, drain_timeout: float) -> int:
    """Run until SIGTERM or SIGINT, then drain."""
    tunnel = Tunnel(settings)
    bound = await tunnel.start()
    name = f"iscl tunnel {settings.mode.value}"
    listening = f"listening on {bound}, links go to {settings.target}"
    print(f"{name}: {listening}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    service.ready(listening)
    await stop.wait()
    draining = f"stopping; waiting up to {drain_timeout:g} s for {tunnel.active_links} open link(s)"
    service.stopping(draining)
    print(f"{name}: {draining}", file=sys.stderr, flush=True)
    aborted = await tunnel.stop(drain_timeout)
    print(f"{name}: stopped ({aborted} link(s) aborted)", file=sys.stderr, flush=True)
    return 0
