"""`iscl server` and `iscl client`: an ISCL link joined to stdin and stdout, like openssl s_server/s_client."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys

from .. import wire
from ..engine import Config
from ..errors import ErrorCode, RemoteProtocolError
from ..keyholder.base import KeyHolder
from ..transport import aio
from .options import add_link_options, build_config, describe, open_link_holder

CHUNK = 64 * 1024


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    server = sub.add_parser(
        "server",
        help="accept one ISCL link and join it to stdin/stdout",
        description="Listen for one ISCL client, authenticate it, then send stdin as secured messages"
        " and write what arrives to stdout. The link's parameters go to stderr. The line is"
        " disconnected once both ends have reached the end of their input. Example:\n"
        "  iscl server --listen 127.0.0.1:2761 < /dev/null > received.bin",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    server.add_argument("--listen", metavar="HOST:PORT", default=f"0.0.0.0:{wire.DEFAULT_PORT}",
                        help="address to listen on (default: %(default)s)")
    add_link_options(server)
    server.set_defaults(run=run_server)

    client = sub.add_parser(
        "client",
        help="open an ISCL link and join it to stdin/stdout",
        description="Connect to an ISCL server, authenticate, then send stdin as secured messages and"
        " write what arrives to stdout. The line is disconnected once both ends have reached the end"
        " of their input. Example:\n  echo hello | iscl client 127.0.0.1 2761",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    client.add_argument("host")
    client.add_argument("port", type=int, nargs="?", default=wire.DEFAULT_PORT)
    add_link_options(client)
    client.set_defaults(run=run_client)


def split_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"iscl: --listen wants HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


async def send_all(stream: aio.IsclStream, data: bytes) -> None:
    """Send ``data`` as one message, or in pieces of the peer's maximum if it refuses it as too long."""
    try:
        await stream.send(data)
    except aio.MessageRefusedError as exc:
        if exc.code is not ErrorCode.PEER_LENGTH_TOO_SMALL or not 0 < exc.peer_max_length < len(data):
            raise
        for start in range(0, len(data), exc.peer_max_length):
            await stream.send(data[start : start + exc.peer_max_length])


async def relay(stream: aio.IsclStream) -> None:
    """Copy stdin to the link and the link to stdout until both sides are done.

    The link is opened with accept_close off (see :func:`link_config`), so the peer cannot disconnect
    the line while this end still has input to send; once stdin ends, this end accepts a disconnection
    and asks for one. If the peer refuses (it still has input), the peer disconnects when it is done.
    """
    print(describe(stream.parameters), file=sys.stderr, flush=True)
    conn = stream.connection
    chunk_size = max(1, min(CHUNK, conn.config.max_message))

    stdin = sys.stdin.buffer
    read = getattr(stdin, "read1", stdin.read)  # read1: whatever is there, without waiting for more

    async def upstream() -> None:
        while chunk := await asyncio.to_thread(read, chunk_size):
            await send_all(stream, chunk)
        conn.config = dataclasses.replace(conn.config, accept_close=True)
        try:
            await stream.close()
        except RemoteProtocolError as exc:
            if exc.code is not ErrorCode.PEER_REFUSED_CLOSE:
                raise

    async def downstream() -> None:
        while (data := await stream.recv()) is not None:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()

    down = asyncio.create_task(downstream())
    up = asyncio.create_task(upstream())
    done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        task.result()
    if down in done:
        up.cancel()  # the peer disconnected; stdin no longer matters
    else:
        await down


def link_config(args: argparse.Namespace) -> Config:
    """The link options, with the peer's close refused until this end's stdin has ended."""
    return dataclasses.replace(build_config(args), accept_close=False)


def run_server(args: argparse.Namespace) -> int:
    config = link_config(args)  # option errors before any token is touched
    host, port = split_address(args.listen)
    return asyncio.run(_serve_one(open_link_holder(args, config), host, port, config))


async def _serve_one(holder: KeyHolder, host: str, port: int, config: Config) -> int:
    finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    failures: list[BaseException] = []

    async def handle(stream: aio.IsclStream) -> None:
        try:
            await relay(stream)
        except Exception as exc:  # noqa: BLE001 - handed to the main task, which reports it
            failures.append(exc)
        finally:
            if not finished.done():
                finished.set_result(None)

    def on_error(peer: object, exc: BaseException) -> None:
        print(f"iscl server: link from {peer} failed during the handshake: {exc}", file=sys.stderr)

    server = await aio.start_server(handle, host, port, key_holder=holder, config=config, on_error=on_error)
    bound = server.sockets[0].getsockname()
    print(f"iscl server: listening on {bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
    async with server:
        await finished
    if failures:
        raise failures[0]
    return 0


def run_client(args: argparse.Namespace) -> int:
    config = link_config(args)  # option errors before any token is touched
    holder = open_link_holder(args, config)

    async def main() -> int:
        try:
            stream = await aio.open_connection(args.host, args.port, key_holder=holder, config=config)
        except OSError as exc:
            raise SystemExit(
                f"iscl: cannot connect to {args.host}:{args.port}: {exc.strerror or exc};"
                " is an ISCL server listening there?"
            ) from None
        await relay(stream)
        return 0

    return asyncio.run(main())
