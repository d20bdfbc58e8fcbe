"""One gateway link: a plain TCP connection joined to an ISCL stream, and its log line.

Each read from the plain side (up to the chunk size) goes out as one ISCL message, so a large read
costs one request/response round trip and one MAC. The plain reader keeps buffering while a message
is being sent (its limit is twice the chunk), so the next message is ready as soon as the last one is
out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..engine import LinkParameters
from ..errors import ErrorCode, IsclError, RemoteProtocolError
from ..transport import aio
from ..wire import SESSION_KEYS

log = logging.getLogger("iscl_hsm.dicom.gateway")

DEFAULT_CHUNK = 1024 * 1024
"""Bytes read from the plain side at a time, and so the largest message the gateway sends (capped by the
link's maximum message). Each message costs a request/response round trip, so larger is faster: 1 MiB
carried a study about 1.4x faster than 256 KiB (docs/gateway.md)."""

LINGER = 10.0
"""Seconds an application may keep its end open after the peer disconnected the line."""

_SETTLE = 1.0
"""Seconds the two directions of an aborted link get to end by themselves before they are cancelled."""

T = TypeVar("T")

_CLOSE_RETRY = (0.01, 1.0)
"""First and longest wait before asking again when the peer refuses to disconnect (it is sending)."""


@dataclass(frozen=True)
class Address:
    """A TCP endpoint, printed as host:port ([v6]:port)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def of(cls, peername: Any) -> Address:
        """From a socket's peername; '?' when the socket is already gone."""
        if not peername:
            return cls("?", 0)
        return cls(str(peername[0]), int(peername[1]))

    @classmethod
    def parse(cls, text: str) -> Address:
        """HOST:PORT or [V6]:PORT; ValueError names the text."""
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{text!r} is not HOST:PORT")
        return cls(host.strip("[]"), int(port))


def _algorithm(value: Any) -> str:
    return str(value.name).lower().replace("_", "-")


@dataclass
class LinkRecord:
    """What the log line of one link says: who, which keys and algorithms, how much, how it ended."""

    source: Address
    """Who connected to this tunnel (a local application, or the far tunnel)."""
    target: Address
    """Where this tunnel connected for it (the far tunnel, or the local application)."""
    parameters: LinkParameters | None = None
    plain_to_iscl: int = 0
    iscl_to_plain: int = 0
    started: float | None = field(default_factory=time.monotonic)

    def line(self, failure: BaseException | None) -> str:
        p = self.parameters
        if p is None:
            keys = "auth_key=- algorithms=- enc_key=-"
        else:
            enc = "session" if p.enc_key_id == SESSION_KEYS else str(p.enc_key_id)
            keys = f"auth_key={p.auth_key_id} algorithms={_algorithm(p.encryption)}+{_algorithm(p.mac)} enc_key={enc}"
        duration = "-" if self.started is None else f"{time.monotonic() - self.started:.2f}s"
        result = "closed" if failure is None else f"aborted: {failure}"
        return (
            f"link from={self.source} to={self.target} {keys} plain_to_iscl={self.plain_to_iscl}"
            f" iscl_to_plain={self.iscl_to_plain} duration={duration} result={result}"
        )

    def finish(self, failure: BaseException | None) -> None:
        """Log the link's line (INFO)."""
        log.info("%s", self.line(failure))


def reset(writer: asyncio.StreamWriter) -> None:
    """Close a plain connection with RST, so that a DICOM application sees an aborted association."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def stopped_reason(drain_timeout: float) -> str:
    return f"the tunnel is stopping and the link did not end within the drain timeout of {drain_timeout:g} s"


class Link:
    """Relay one plain connection and one ISCL stream until either side ends, then log the link.

    A tunnel creates it with the side it accepted and passes :meth:`run` the coroutine that opens the
    other side (with :meth:`attach_plain` or :meth:`attach_iscl`).
    """

    def __init__(self, record: LinkRecord, *, plain: Address, iscl: Address, chunk_size: int) -> None:
        self.record = record
        self._plain = plain
        self._iscl = iscl
        self._chunk = chunk_size
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._stream: aio.IsclStream | None = None
        self._peer_closed = False

    def attach_plain(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    def attach_iscl(self, stream: aio.IsclStream) -> None:
        self._stream = stream
        self.record.parameters = stream.parameters
        self._chunk = max(1, min(self._chunk, stream.connection.config.max_message))

    async def run(self, connect: Awaitable[None]) -> None:
        """Open the other side with ``connect``, relay until the end, log; never raises but cancellation."""
        try:
            await connect
            await self._relay()
        except asyncio.CancelledError as exc:
            await self._abort()
            self.record.finish(IsclError(ErrorCode.CONNECTION_LOST, str(exc.args[0] if exc.args else exc)))
            raise
        except (IsclError, OSError) as exc:
            await self._abort()
            self.record.finish(exc if isinstance(exc, IsclError) else _failed(f"the ISCL link with {self._iscl}", exc))
        else:
            self.record.finish(None)

    # --- internals ------------------------------------------------------------------------------

    async def _relay(self) -> None:
        up = asyncio.create_task(self._plain_to_iscl())
        down = asyncio.create_task(self._iscl_to_plain())
        try:
            done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            if up.done():
                await down  # our disconnection went through: recv() ends the downstream
            else:  # the peer disconnected the line: the application normally ends its side too
                done, _ = await asyncio.wait({up}, timeout=LINGER)
                if done:
                    up.result()
            assert self._writer is not None
            self._writer.close()
        except BaseException:
            await self._abort()  # the other direction then ends by itself, with the link's error
            await asyncio.wait({up, down}, timeout=_SETTLE)
            raise
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)

    async def _plain_to_iscl(self) -> None:
        assert self._reader is not None and self._stream is not None
        while data := await self._plain_io(self._reader.read(self._chunk)):
            if self._peer_closed:
                raise IsclError(
                    ErrorCode.CONNECTION_LOST,
                    f"the application at {self._plain} sent {len(data)} bytes after the peer disconnected the line",
                )
            await self._send(data)
            self.record.plain_to_iscl += len(data)
        if not self._peer_closed:
            await self._disconnect()

    async def _iscl_to_plain(self) -> None:
        assert self._writer is not None and self._stream is not None
        while (data := await self._stream.recv()) is not None:
            self._writer.write(data)
            self.record.iscl_to_plain += len(data)
            await self._plain_io(self._writer.drain())
        self._peer_closed = True
        if self._writer.can_write_eof():
            self._writer.write_eof()  # a half-close: the application reads the end of the stream

    async def _send(self, data: bytes) -> None:
        """Send ``data`` as one message, or in pieces of the peer's maximum when it refuses it as too long."""
        assert self._stream is not None
        while data:
            piece, data = data[: self._chunk], data[self._chunk :]
            try:
                await self._stream.send(piece)
            except aio.MessageRefusedError as exc:
                if exc.code is not ErrorCode.PEER_LENGTH_TOO_SMALL or not 0 < exc.peer_max_length < len(piece):
                    raise
                self._chunk = exc.peer_max_length
                data = piece + data

    async def _disconnect(self) -> None:
        """The line disconnection protocol; the peer refuses while it is sending, so ask again."""
        assert self._stream is not None
        delay, longest = _CLOSE_RETRY
        while True:
            try:
                await self._stream.close()
                return
            except RemoteProtocolError as exc:
                if exc.code is not ErrorCode.PEER_REFUSED_CLOSE:
                    raise
            await asyncio.sleep(delay)
            delay = min(2 * delay, longest)

    async def _abort(self) -> None:
        if self._writer is not None:
            reset(self._writer)
        if self._stream is not None:
            await self._stream.abort()

    async def _plain_io(self, operation: Awaitable[T]) -> T:
        """A read or drain on the plain side; its socket errors name the application's address."""
        try:
            return await operation
        except OSError as exc:
            raise _failed(f"the connection with {self._plain}", exc) from None


def _failed(what: str, exc: OSError) -> IsclError:
    """A socket error as one sentence naming the connection (plain side or ISCL side) it broke."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return IsclError(ErrorCode.CONNECTION_LOST, f"{what} failed: {reason}")


__all__ = ["DEFAULT_CHUNK", "Address", "Link", "LinkRecord", "reset", "stopped_reason"]
