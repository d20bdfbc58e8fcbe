"""`iscl server` and `iscl client`: an ISCL link joined to stdin and stdout, like openssl s_server/s_client."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Coroutine
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from .. import wire
from ..engine import Config, Profile
from ..errors import ErrorCode, IsclError, RemoteProtocolError
from ..keyholder.base import KeyHolder
from ..repeats import RepeatFilter
from ..transport import aio
from ..transport.common import Address, Timeouts
from .options import (
    add_link_options,
    add_timeout_options,
    build_config,
    build_timeouts,
    describe,
    open_link_holder,
)

T = TypeVar("T")

CHUNK = 64 * 1024
AHEAD = 4
"""Chunks of stdin read ahead of the link: enough to keep it busy, little enough to bound memory."""


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    server = sub.add_parser(
        "server",
        help="accept one ISCL link and join it to stdin/stdout",
        description="Listen for one ISCL client, authenticate it, then send stdin as secured messages and"
        " write what arrives to stdout. The link's parameters go to stderr. The line is disconnected"
        " once both ends have reached the end of their input; any other ending (a failure, a timeout,"
        " a signal) exits non-zero. Other clients are refused while the link runs, unless"
        " --accept-many. Examples:\n"
        "  iscl server --listen 127.0.0.1:2761 < /dev/null > received.bin\n"
        "  iscl server --listen 0.0.0.0:2761 --accept-many incoming/   # each link to its own file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    server.add_argument("--listen", metavar="HOST:PORT", default=f"0.0.0.0:{wire.DEFAULT_PORT}",
                        help="address to listen on (default: %(default)s)")
    server.add_argument("--accept-many", metavar="DIR", type=Path,
                        help="accept links until SIGTERM or SIGINT, writing what each one brings to its own"
                        " file DIR/link-N.bin (stdin is not used)")
    add_link_options(server)
    add_timeout_options(server)
    server.set_defaults(run=run_server)

    client = sub.add_parser(
        "client",
        help="open an ISCL link and join it to stdin/stdout",
        description="Connect to an ISCL server, authenticate, then send stdin as secured messages and"
        " write what arrives to stdout. The line is disconnected once both ends have reached the end"
        " of their input; any other ending exits non-zero. Example:\n"
        "  echo hello | iscl client 127.0.0.1 2761",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    client.add_argument("host")
    client.add_argument("port", type=int, nargs="?", default=wire.DEFAULT_PORT)
    add_link_options(client)
    add_timeout_options(client)
    client.set_defaults(run=run_client)


def split_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"iscl: --listen wants HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


class Stopped(Exception):
    """SIGTERM or SIGINT ended the command; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


async def until_signal(work: Awaitable[T]) -> T:
    """``work``, unless SIGTERM or SIGINT comes first: then it is cancelled and :class:`Stopped` raised."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    caught: list[int] = []

    def stop(signum: int) -> None:
        caught.append(signum)
        task.cancel()

    handled: list[signal.Signals] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop, signum)
        except NotImplementedError:  # Windows: Ctrl-C ends asyncio.run with KeyboardInterrupt instead
            continue
        handled.append(signum)
    try:
        return await task
    except asyncio.CancelledError:
        if caught:
            raise Stopped(caught[0]) from None
        raise
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)


class InputReader:
    """A file read a chunk at a time in a daemon thread, at most :data:`AHEAD` chunks ahead of the link.

    Not ``asyncio.to_thread``: a read blocked on a terminal would keep the process from exiting once
    the link is over, since asyncio joins its default executor's threads at the end. And ``os.read``
    on the descriptor, not the buffered file: a daemon thread blocked inside the buffered reader holds
    its lock, which the interpreter needs at exit.
    """

    def __init__(self, source: BinaryIO, chunk_size: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(AHEAD)
        threading.Thread(
            target=self._run, args=(source.fileno(), chunk_size), name="iscl-stdin", daemon=True
        ).start()

    def _run(self, fd: int, chunk_size: int) -> None:
        try:
            while True:
                chunk = os.read(fd, chunk_size)  # whatever is there, without waiting for more
                asyncio.run_coroutine_threadsafe(self._queue.put(chunk), self._loop).result()
                if not chunk:
                    return
        except (OSError, ValueError, RuntimeError, concurrent.futures.CancelledError):
            return  # input closed, or the loop gone or going (its put cancelled): the link is over

    async def read(self) -> bytes:
        """The next chunk; b"" at the end of the input."""
        return await self._queue.get()


async def on_link(stream: aio.IsclStream, operation: Coroutine[Any, Any, T]) -> T:
    """``operation`` on the link; a socket error (the peer reset the connection, say) becomes one
    sentence naming the peer, as the gateway's log line says it, not a bare errno."""
    try:
        return await operation
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise IsclError(
            ErrorCode.CONNECTION_LOST, f"the ISCL link with {Address.of(stream.peer)} failed: {reason}"
        ) from None


async def send_all(stream: aio.IsclStream, data: bytes) -> None:
    """Send ``data`` as one message, or in pieces of the peer's maximum if it refuses it as too long."""
    try:
        await stream.send(data)
    except aio.MessageRefusedError as exc:
        if exc.code is not ErrorCode.PEER_LENGTH_TOO_SMALL or not 0 < exc.peer_max_length < len(data):
            raise
        for start in range(0, len(data), exc.peer_max_length):
            await stream.send(data[start : start + exc.peer_max_length])


async def relay(stream: aio.IsclStream, source: BinaryIO | None, sink: BinaryIO, name: str) -> None:
    """Copy ``source`` (None: nothing) to the link and the link to ``sink`` until both sides are done.

    The link is opened with accept_close off (see :func:`link_config`), so the peer cannot disconnect
    the line while this end still has input to send; once the input ends, this end accepts a
    disconnection and asks for one. If the peer refuses (it still has input), the peer disconnects
    when it is done. Every task is awaited, so a failure is raised once, and nothing is left running.
    """
    print(describe(stream.parameters), file=sys.stderr, flush=True)
    conn = stream.connection
    reader = None if source is None else InputReader(source, max(1, min(CHUNK, conn.config.max_message)))

    async def upstream() -> None:
        while reader is not None and (chunk := await reader.read()):
            await on_link(stream, send_all(stream, chunk))
        conn.config = dataclasses.replace(conn.config, accept_close=True)
        try:
            await on_link(stream, stream.close())
        except RemoteProtocolError as exc:
            if exc.code is not ErrorCode.PEER_REFUSED_CLOSE:
                raise

    async def downstream() -> None:
        while (data := await on_link(stream, stream.recv())) is not None:
            sink.write(data)
            sink.flush()

    down = asyncio.create_task(downstream())
    up = asyncio.create_task(upstream())
    try:
        done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
        if down not in done:
            await down
        # else the peer disconnected: what is left of the input no longer matters
    finally:
        # One turn of the loop first: a task that the same lost connection has just woken (a drain in
        # a send, failed by the reset) then takes its error. Cancelled before it runs, it would leave
        # that error unretrieved, and asyncio prints "Future exception was never retrieved" at exit.
        await asyncio.sleep(0)
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        await stream.abort()  # (a no-op after a completed disconnection)
    if stream.closed_by_peer and conn.config.profile is Profile.V100:
        print(f"{name}: closed by the peer (unauthenticated in V1.00: someone on the path could have ended"
              " the stream early; --profile hardened on both ends detects that)", file=sys.stderr, flush=True)


def link_config(args: argparse.Namespace) -> Config:
    """The link options, with the peer's close refused until this end's stdin has ended."""
    return dataclasses.replace(build_config(args), accept_close=False)


def exit_status(stopped: Stopped, name: str, what: str) -> int:
    print(f"{name}: stopped by {stopped}; {what}", file=sys.stderr, flush=True)
    return 128 + stopped.signum


# --- iscl server ----------------------------------------------------------------------------------


def run_server(args: argparse.Namespace) -> int:
    config = link_config(args)  # option errors before any token is touched
    host, port = split_address(args.listen)
    if args.accept_many is not None and not args.accept_many.is_dir():
        raise SystemExit(f"iscl: --accept-many wants an existing folder; {args.accept_many} is not one")
    server = LinkServer(open_link_holder(args, config), config, build_timeouts(args), args.accept_many)
    return asyncio.run(server.run(host, port))


class LinkServer:
    """`iscl server`: one link joined to stdin/stdout, or with ``many`` every link to its own file."""

    name = "iscl server"

    def __init__(self, holder: KeyHolder, config: Config, timeouts: Timeouts, many: Path | None) -> None:
        self._holder = holder
        self._config = config
        self._timeouts = timeouts
        self._many = many
        self._links = 0
        self._open: dict[aio.IsclStream, asyncio.Task[object]] = {}  # each open link and the task serving it
        self._failures: list[IsclError | OSError] = []
        self._repeats = RepeatFilter()
        self._listener: asyncio.Server | None = None
        self._first_over: asyncio.Future[None] | None = None

    async def run(self, host: str, port: int) -> int:
        self._first_over = asyncio.get_running_loop().create_future()
        self._listener = await aio.start_server(
            self._handle, host, port, key_holder=self._holder, config=self._config, on_error=self._handshake_failed,
            timeouts=self._timeouts,
        )  # fmt: skip
        bound = self._listener.sockets[0].getsockname()
        print(f"{self.name}: listening on {bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
        try:
            async with self._listener:
                await until_signal(self._first_over if self._many is None else asyncio.Event().wait())
        except Stopped as stopped:
            aborted = len(self._open)
            await self._abort_all()
            if self._many is None:
                return exit_status(stopped, self.name, "the link was aborted" if aborted else "no link was made")
            print(f"{self.name}: stopped by {stopped}; {self._links} link(s), {len(self._failures)} failed,"
                  f" {aborted} aborted", file=sys.stderr, flush=True)
            return 1 if self._failures or aborted else 0
        if self._failures:
            raise self._failures[0]
        return 0

    async def _abort_all(self) -> None:
        """Abort every open link and wait for its task, which then ends with the link's failure."""
        tasks = list(self._open.values())
        for stream in list(self._open):
            await stream.abort()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, stream: aio.IsclStream) -> None:
        self._links += 1
        number, peer = self._links, Address.of(stream.peer)
        if self._many is None and number > 1:
            print(f"{self.name}: refused the link from {peer}: this server takes one link (--accept-many takes more)",
                  file=sys.stderr, flush=True)
            await stream.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._open[stream] = task
        try:
            if self._many is None:
                assert self._listener is not None
                self._listener.close()  # no further connections
                await relay(stream, sys.stdin.buffer, sys.stdout.buffer, self.name)
            else:
                await self._to_file(stream, number, peer)
        except (IsclError, OSError) as exc:
            self._failures.append(exc)
            if self._many is not None:
                print(f"{self.name}: link {number} from {peer} failed: {exc}", file=sys.stderr, flush=True)
        finally:
            self._open.pop(stream, None)
            if self._first_over is not None and not self._first_over.done() and self._many is None:
                self._first_over.set_result(None)

    async def _to_file(self, stream: aio.IsclStream, number: int, peer: Address) -> None:
        assert self._many is not None
        path = self._many / f"link-{number}.bin"
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as sink:
            await relay(stream, None, sink, f"{self.name}: link {number} from {peer}")
            size = sink.tell()
        print(f"{self.name}: link {number} from {peer}: {size} bytes in {path}", file=sys.stderr, flush=True)

    def _handshake_failed(self, peer: object, exc: BaseException) -> None:
        address = Address.of(peer)
        line = self._repeats.failure(address.host, exc, f"{self.name}: link from {address} failed during the handshake: {exc}")
        if line is not None:
            print(line, file=sys.stderr, flush=True)


# --- iscl client ----------------------------------------------------------------------------------


def run_client(args: argparse.Namespace) -> int:
    config = link_config(args)  # option errors before any token is touched
    holder = open_link_holder(args, config)
    timeouts = build_timeouts(args)

    async def connect_and_relay() -> int:
        try:
            stream = await aio.open_connection(args.host, args.port, key_holder=holder, config=config, timeouts=timeouts)
        except OSError as exc:
            raise SystemExit(
                f"iscl: cannot connect to {args.host}:{args.port}: {exc.strerror or exc};"
                " is an ISCL server listening there?"
            ) from None
        await relay(stream, sys.stdin.buffer, sys.stdout.buffer, "iscl client")
        return 0

    async def main() -> int:
        try:
            return await until_signal(connect_and_relay())
        except Stopped as stopped:
            return exit_status(stopped, "iscl client", "the link was aborted")

    return asyncio.run(main())
