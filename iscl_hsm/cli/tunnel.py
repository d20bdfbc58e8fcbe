"""`iscl tunnel client|server`: the ISCL gateway in front of unmodified DICOM applications.

Every option can also come from a TOML file (``--config FILE``) under its long name without the
dashes (``max-message = 1048576``); options on the command line override the file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import dataclasses
import logging
import os
import signal
import socket
import tempfile
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .. import logs, service, wire
from ..dicom import gateway, metrics, workers
from ..dicom.gateway import (
    DEFAULT_CHUNK,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    LISTEN_BACKLOG,
    Address,
    Mode,
    Tunnel,
    TunnelSettings,
)
from ..errors import ErrorCode, IsclError
from ..transport.admission import Admission, Network, parse_network
from . import main
from .options import (
    add_link_options,
    add_timeout_options,
    build_config,
    build_timeouts,
    open_link_holder,
    read_pin,
    seconds,
    wants_card,
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
        parsed.from_command_line = frozenset(
            a.dest for a in self._file_options() if getattr(parsed, a.dest) not in (_UNSET, None)
        )
        parsed.config_parser = self
        self._fill_from_file(parsed, self.error)
        return parsed, extras

    def reread(self, args: argparse.Namespace) -> argparse.Namespace:
        """``args`` with the config file read again (options given on the command line still win);
        ReloadError, naming the file, if it cannot be read or holds a bad value."""

        def fail(message: str) -> NoReturn:
            raise ReloadError(message)

        fresh = copy.copy(args)
        self._fill_from_file(fresh, fail)
        return fresh

    def _fill_from_file(self, parsed: argparse.Namespace, fail: Callable[[str], NoReturn]) -> None:
        settings = _read_config_file(parsed.config, self, fail) if parsed.config is not None else {}
        for action in self._file_options():
            if action.dest not in parsed.from_command_line:
                setattr(parsed, action.dest, settings.get(action.dest, _default(action)))
        if getattr(parsed, parsed.target_option) is None:
            fail(f"--{parsed.target_option} HOST:PORT is required (or '{parsed.target_option}' in the --config file)")

    def _file_options(self) -> list[argparse.Action]:
        return [a for a in self._actions if a.option_strings and a.dest not in _NOT_IN_FILE]


def _is_list(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction)


def _default(action: argparse.Action) -> Any:
    """The option's default, converted as argparse converts string defaults."""
    if isinstance(action.default, str) and callable(action.type):
        return action.type(action.default)
    return action.default


class ReloadError(Exception):
    """The config file could not be read again; the tunnel keeps the settings it has."""


def _read_config_file(path: Path, parser: _ConfigFileParser, fail: Callable[[str], NoReturn]) -> dict[str, Any]:
    """The file's settings by option dest; an unknown key or a bad value is ``fail(message)``, naming both."""
    try:
        with path.open("rb") as file:
            table = tomllib.load(file)
    except OSError as exc:
        fail(f"cannot read the config file {path}: {exc.strerror}")
    except tomllib.TOMLDecodeError as exc:
        fail(f"the config file {path} is not valid TOML: {exc}")
    options = {a.option_strings[-1].removeprefix("--"): a for a in parser._file_options()}
    settings = {}
    for key, value in table.items():
        action = options.get(key)
        if action is None:
            fail(
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
            fail(f"the config file {path}, key '{key}': {exc}")
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


def _network(text: str) -> Network:
    try:
        return parse_network(text)
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
        " application it guards. One log line per link when it ends (see `iscl docs gateway`).",
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
    group.add_argument("--allow-from", metavar="CIDR", type=_network, action="append",
                       help="accept connections only from this address or network (e.g. 10.0.0.0/8); repeat"
                       " for more (default: from anywhere). Others are dropped before any handshake, with"
                       " one log line a minute per host")
    group.add_argument("--proxy-protocol", action="store_true",
                       help="every connection comes through a load balancer that starts it with a PROXY"
                       " protocol header (HAProxy's send-proxy-v2, or v1): logs and --allow-from see the"
                       " real client it names. A connection without one within --handshake-timeout is dropped"
                       " (`iscl docs scale-out`)")
    group.add_argument("--workers", metavar="N", type=_positive(int), default=None,
                       help="processes sharing the listening port, each with its own token session (default: the"
                       " number of cores; 1 with an IC card, which one process at a time can use)")
    group.add_argument("--metrics", metavar="HOST:PORT", type=_address,
                       help="serve Prometheus metrics on http://HOST:PORT/metrics: links open and ended by result"
                       " and error, bytes each way, handshake, message-size and key-holder-call histograms"
                       " (`iscl docs gateway`, \"Metrics\"); default: none")
    group.add_argument("--log-format", choices=logs.FORMATS, default="text",
                       help="log lines on stderr as logfmt ('text') or JSON objects ('json'), one per line, with"
                       " the same keys (default: %(default)s; `iscl docs gateway`, \"The link line\")")


RESTART_ONLY = ("listen", "workers", "metrics", "log_format")
"""Options a reload cannot change (the socket, the processes and the log are set up once)."""

log = logging.getLogger(__name__)


def run_tunnel(args: argparse.Namespace) -> int:
    build_config(args)  # option errors before any token is touched
    for name in (__name__, gateway.__name__, workers.__name__):
        if not logging.getLogger(name).isEnabledFor(logging.INFO):
            logging.getLogger(name).setLevel(logging.INFO)  # the per-link lines are the gateway's output
    count = _worker_count(args)
    sock = _listen(args.listen)
    bound = Address.of(sock.getsockname())
    name = f"iscl tunnel {args.mode.value}"
    listening = f"listening on {bound}, links go to {getattr(args, args.target_option)}"

    def ready() -> None:
        log.info("%s: %s", name, listening, extra=logs.fields(listen=str(bound), workers=count))
        service.ready(listening)

    with sock:
        if count == 1:
            if args.metrics is not None:
                _serve_metrics(args.metrics)
            return _work(args, sock, ready, None, listening)
        _ask_pin_once(args)
        with tempfile.TemporaryDirectory(prefix="iscl-metrics-") as folder:
            if args.metrics is not None:
                metrics.use_shared_folder(Path(folder))
                _serve_metrics(args.metrics)
            draining = f"stopping; waiting up to {args.drain_timeout:g} s for the open links of {count} workers"
            supervisor = workers.Supervisor(
                count,
                lambda number, worker_ready: main.reporting(lambda: _work(args, sock, worker_ready, number, None), "tunnel"),
                listener=sock,
                on_ready=ready,
                on_stopping=lambda: _stopping(name, draining),
                on_reload=lambda: service.reloading(listening),
                on_exit=metrics.worker_exited,
                drain_timeout=args.drain_timeout,
            )
            status = supervisor.run()
    if supervisor.started:
        log.info("%s: stopped", name, extra=logs.fields(status=status))
    return status


def _worker_count(args: argparse.Namespace) -> int:
    if wants_card(args):
        one_only = "an IC card serves one process at a time: leave out --workers or give --workers 1 with --card/--reader"
    elif not hasattr(os, "fork"):
        one_only = "worker processes need fork(), which this system lacks: leave out --workers or give --workers 1"
    else:
        return args.workers or os.cpu_count() or 1
    if (args.workers or 1) > 1:
        raise IsclError(ErrorCode.BAD_OPTION, one_only)
    return 1


def _listen(address: Address) -> socket.socket:
    """The tunnel's listening socket, bound here so that every worker accepts from it."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    try:
        return socket.create_server((address.host, address.port), family=family, backlog=LISTEN_BACKLOG)
    except OSError as exc:
        raise IsclError(ErrorCode.BAD_OPTION, f"cannot listen on {address}: {exc.strerror or exc}; is another"
                        " tunnel or service using it? (--listen HOST:PORT)") from None  # fmt: skip


def _serve_metrics(address: Address) -> None:
    try:
        served = metrics.serve(address)
    except OSError as exc:
        raise IsclError(ErrorCode.BAD_OPTION, f"cannot serve metrics on {address}: {exc.strerror or exc}"
                        " (--metrics HOST:PORT)") from None  # fmt: skip
    log.info("metrics on http://%s/metrics", served, extra=logs.fields(metrics=str(served)))


def _ask_pin_once(args: argparse.Namespace) -> None:
    """Ask for the token's PIN here, once, rather than in every worker (each reads it from $ISCL_PIN)."""
    if args.token is not None and args.pin_file is None and "ISCL_PIN" not in os.environ:
        os.environ["ISCL_PIN"] = read_pin(None, f"token '{args.token}'")


def _settings(args: argparse.Namespace, counts: metrics.NoMetrics) -> TunnelSettings:
    """The tunnel's settings, with its key holder opened (and timed, with metrics)."""
    config = build_config(args)
    return TunnelSettings(
        mode=args.mode, listen=args.listen, target=getattr(args, args.target_option),
        key_holder=counts.timed(open_link_holder(args, config)), config=config, chunk_size=args.chunk_size,
        connect_timeout=args.connect_timeout, idle_timeout=args.idle_timeout or None,
        timeouts=dataclasses.replace(build_timeouts(args), idle=None),
        admission=Admission(allow_from=tuple(args.allow_from or ()), proxy_protocol=args.proxy_protocol),
    )  # fmt: skip


def _stopping(name: str, status: str) -> None:
    log.info("%s: %s", name, status)
    service.stopping(status)


def _work(
    args: argparse.Namespace, sock: socket.socket, ready: Callable[[], None], number: int | None, status: str | None
) -> int:
    """One worker: open the keys, serve until SIGTERM or SIGINT, drain; SIGHUP reloads. Worker ``number``
    of several, or (None) the tunnel's only process, which reports to systemd itself (its ``status``)."""
    if number is not None:
        logs.add_fields(worker=number)
    counts = metrics.GatewayMetrics(args.mode.value) if args.metrics is not None else metrics.NoMetrics()
    return asyncio.run(_serve(args, _settings(args, counts), sock, ready, counts, status))


async def _serve(
    args: argparse.Namespace,
    settings: TunnelSettings,
    sock: socket.socket,
    ready: Callable[[], None],
    counts: metrics.NoMetrics,
    status: str | None,
) -> int:
    """Serve until SIGTERM or SIGINT, then drain; with ``status``, this process tells systemd of it."""
    tunnel = Tunnel(settings, counts)
    try:
        await tunnel.start(sock)
        stop = asyncio.Event()
        reloader = _Reloader(tunnel, args, counts, status)
        for name in ("SIGTERM", "SIGINT"):
            _on_signal(name, stop.set)
        _on_signal("SIGHUP", reloader.start)
        ready()  # (once the signals are handled: a SIGTERM right after READY=1 drains, it does not kill)
        await stop.wait()
        tunnel.stop_accepting()
        name = f"iscl tunnel {settings.mode.value}"
        draining = f"stopping; waiting up to {args.drain_timeout:g} s for {tunnel.active_links} open link(s)"
        if status is not None:
            _stopping(name, draining)
        else:
            log.info("%s: %s", name, draining)
        await reloader.finish()
        aborted = await tunnel.stop(args.drain_timeout)
        log.info("%s: stopped (%d link(s) aborted)", name, aborted, extra=logs.fields(aborted=aborted))
        return 0
    finally:
        tunnel.settings.key_holder.close()


def _on_signal(name: str, handler: Callable[[], None]) -> None:
    """Run ``handler`` on the event loop when signal ``name`` arrives; on Windows, which has no SIGHUP and
    no loop signal handlers, nothing (Ctrl-C ends the tunnel through KeyboardInterrupt instead)."""
    signum = getattr(signal, name, None)
    if signum is not None:
        with contextlib.suppress(NotImplementedError):
            asyncio.get_running_loop().add_signal_handler(signum, handler)


class _Reloader:
    """SIGHUP: read the config file again, open the key holder again (a rotated or imported key is used
    by new links; open links finish on the old), log what changed; on any failure keep it all as it was."""

    def __init__(self, tunnel: Tunnel, args: argparse.Namespace, counts: metrics.NoMetrics, status: str | None) -> None:
        self._tunnel = tunnel
        self._status = status  # this process tells systemd of reloads (the only one), else None
        self._args = args
        self._counts = counts
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def start(self) -> None:
        if self._task is not None and not self._task.done():
            self._again = True  # once the running reload ends: the file may have changed again since it began
            return
        self._task = asyncio.create_task(self._reload())

    async def finish(self) -> None:
        if self._task is not None:
            await self._task

    async def _reload(self) -> None:
        while True:
            self._again = False
            with service.reloading(self._status) if self._status is not None else contextlib.nullcontext():
                await self._reload_once()
            if not self._again:
                return

    async def _reload_once(self) -> None:
        old = self._args
        try:
            new = old.config_parser.reread(old)
            for name in RESTART_ONLY:
                if getattr(new, name) != getattr(old, name):
                    log.warning("reload: %s changed in the config file; it takes effect at the next restart",
                                name.replace("_", "-"), extra=logs.fields(option=name.replace("_", "-")))  # fmt: skip
                    setattr(new, name, getattr(old, name))
            settings = await asyncio.to_thread(_settings, new, self._counts)
            try:
                self._tunnel.reload(settings)
            except BaseException:
                settings.key_holder.close()
                raise
        except (ReloadError, IsclError, OSError) as exc:
            log.error("reload failed; the tunnel keeps its previous settings and keys: %s", exc,
                      extra=logs.fields(result="failed", error=str(exc)))  # fmt: skip
            return
        self._args = new
        changed = _changes(old, new)
        log.info("reloaded: key holder opened again; %s", f"changed {changed}" if changed else "no option changed",
                 extra=logs.fields(result="reloaded", changed=changed or "-"))  # fmt: skip


def _changes(old: argparse.Namespace, new: argparse.Namespace) -> str:
    """``option=value`` for each option whose value differs (no option holds a secret: a PIN is in a file)."""
    parser: _ConfigFileParser = old.config_parser
    changed = []
    for action in parser._file_options():
        value = getattr(new, action.dest)
        if value != getattr(old, action.dest):
            shown = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            changed.append(f"{action.option_strings[-1].removeprefix('--')}={shown}")
    return " ".join(changed)
