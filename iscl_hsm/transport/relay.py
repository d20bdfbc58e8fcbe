"""A relay between a plain stream and an ISCL stream, both ways, until either side ends.

Each read from the plain side (up to the chunk size) goes out as one ISCL message, so a large read
costs one request/response round trip and one MAC; a message the peer refuses as too long is split to
the peer's maximum. The plain reader keeps buffering while a message is being sent, so the next message
is ready as soon as the last one is out. A read that says more is on its way (the link's ``coalesce``
test, e.g. a DICOM command whose data set follows) waits up to :data:`COALESCE_WAIT` for it and goes
out together with it, saving a round trip.

How a link ends:

* the application ends its stream (EOF): everything read so far goes out, then the ISCL line
  disconnection runs (asked again while the peer refuses it because it is still sending);
* the peer disconnects the line: the plain side is half-closed (the application reads the end of the
  stream) and the application gets :data:`LINGER` seconds to end its side;
* no data either way for the idle timeout (when there is one): as below, with a result that says so;
* anything else (a MAC failure, a peer abort, a lost connection on either side): the plain side is
  reset (RST), the ISCL link aborted, and nothing after the failure is forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..engine import LinkParameters, State
from ..errors import ErrorCode, IsclError, RemoteProtocolError, error_name
from ..logs import fields
from ..wire import SESSION_KEYS
from . import aio
from .common import Address

LINGER = 10.0
"""Seconds an application may keep its end open after the peer disconnected the line."""

_SETTLE = 1.0
"""Seconds the two directions of an aborted link get to end by themselves before they are cancelled."""

_CLOSE_RETRY = (0.01, 1.0)
"""First and longest wait before asking again when the peer refuses to disconnect (it is sending)."""

COALESCE_WAIT = 0.002
"""Seconds a read that announces more data waits for it. A storage SCU's data set follows its command
within a fraction of a millisecond; if it is slower, the command simply goes out alone."""

T = TypeVar("T")


def _algorithm(value: Any) -> str:
    return str(value.name).lower().replace("_", "-")


DEFAULT_CHUNK = 1024 * 1024
"""Bytes read from the plain side at a time, and so the largest message a link sends (capped by the
link's maximum message). Each message costs a request/response round trip, so larger is faster: 1 MiB
carried a study about 1.4x faster than 256 KiB through the gateway (docs/gateway.md), and 1.3x faster
than 64 KiB through the pynetdicom bridge. Readers of the plain side need a buffer limit of twice this
(asyncio's ``limit``) for such reads to fill."""


@dataclass
class LinkRecord:
    """What the log line of one link says: who, which keys and algorithms, how much, how it ended."""

    source: Address
    """Who connected (a local application, or the far end of the ISCL link)."""
    target: Address
    """Where the connection was taken (the far end of the ISCL link, or the local application)."""
    parameters: LinkParameters | None = None
    plain_to_iscl: int = 0
    iscl_to_plain: int = 0
    started: float | None = field(default_factory=time.monotonic)

    def fields(self, failure: BaseException | None) -> dict[str, object]:
        """The line's fields: ``result`` is ``closed`` or ``aborted``, and an aborted link's ``error``
        says why, its ``code`` naming the ISCL error (or the exception's type)."""
        p = self.parameters
        values: dict[str, object] = {"from": str(self.source), "to": str(self.target)}
        if p is None:
            values |= {"profile": "-", "auth_key": "-", "algorithms": "-", "enc_key": "-"}
        else:
            values |= {
                "profile": p.profile.value,
                "auth_key": p.auth_key_id,
                "algorithms": f"{_algorithm(p.encryption)}+{_algorithm(p.mac)}",
                "enc_key": "session" if p.enc_key_id == SESSION_KEYS else p.enc_key_id,
            }
        values |= {
            "plain_to_iscl": self.plain_to_iscl,
            "iscl_to_plain": self.iscl_to_plain,
            "duration": "-" if self.started is None else round(time.monotonic() - self.started, 3),
        }
        if failure is None:
            values["result"] = "closed"
        else:
            values |= {"result": "aborted", "code": error_name(failure), "error": str(failure)}
        return values


def reset(writer: asyncio.StreamWriter) -> None:
    """Close a plain connection with RST, so that a DICOM application sees an aborted association."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Link:
    """Relay one plain stream and one ISCL stream until either side ends.

    Whoever accepted one side creates it with that side attached (:meth:`attach_plain` or
    :meth:`attach_iscl`) and passes :meth:`run` the coroutine that opens and attaches the other.
    ``plain`` and ``iscl`` name the two sides in error messages. With a ``logger``, the link's
    :class:`LinkRecord` line is logged (INFO) when it ends. :attr:`error` is the failure that ended it.
    ``coalesce(data)``, if given, says whether a read that emptied the plain side's buffer announces
    more data: the link then waits briefly for it before sending. ``on_message(direction, size)``, if
    given, hears of each message sent (``plain_to_iscl``) or received (``iscl_to_plain``).
    """

    def __init__(
        self,
        record: LinkRecord,
        *,
        plain: Address | str,
        iscl: Address | str,
        chunk_size: int,
        idle_timeout: float | None = None,
        logger: logging.Logger | None = None,
        coalesce: Callable[[bytes], bool] | None = None,
        on_message: Callable[[str, int], None] | None = None,
    ) -> None:
        self.record = record
        self.error: IsclError | None = None
        self._plain = plain
        self._iscl = iscl
        self._chunk = chunk_size
        self._idle_timeout = idle_timeout
        self._last_data = time.monotonic()  # when data last came from either side
        self._logger = logger
        self._coalesce = coalesce
        self._on_message = on_message
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._stream: aio.IsclStream | None = None

    def attach_plain(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    def attach_iscl(self, stream: aio.IsclStream) -> None:
        self._stream = stream
        self.record.parameters = stream.parameters
        self._chunk = max(1, min(self._chunk, stream.connection.config.max_message))

    async def run(self, connect: Awaitable[None] | None = None) -> IsclError | None:
        """Open the other side with ``connect``, relay until the end, log; the failure, if any.

        Never raises but cancellation (after aborting both sides and logging).
        """
        try:
            if connect is not None:
                await connect
            await self._relay_until_idle()
        except asyncio.CancelledError as exc:
            await self._abort()
            self._finish(IsclError(ErrorCode.CONNECTION_LOST, str(exc.args[0] if exc.args else exc)))
            raise
        except (IsclError, OSError) as exc:
            await self._abort()
            self._finish(exc if isinstance(exc, IsclError) else _failed(f"the ISCL link with {self._iscl}", exc))
        else:
            self._finish(None)
        return self.error

    # --- internals ------------------------------------------------------------------------------

    def _finish(self, failure: IsclError | None) -> None:
        self.error = failure
        if self._logger is not None:
            self._logger.info("link", extra=fields(**self.record.fields(failure)))

    async def _relay_until_idle(self) -> None:
        """:meth:`_relay`, aborted once no data has come from either side for the idle timeout."""
        if self._idle_timeout is None:
            await self._relay()
            return
        self._last_data = time.monotonic()
        relay = asyncio.create_task(self._relay())
        try:
            while (left := self._last_data + self._idle_timeout - time.monotonic()) > 0:
                done, _ = await asyncio.wait({relay}, timeout=left)
                if done:
                    relay.result()
                    return
        finally:
            if not relay.done():
                relay.cancel()  # _relay aborts both sides on its way out
                await asyncio.gather(relay, return_exceptions=True)
        raise IsclError(
            ErrorCode.CONNECTION_LOST,
            f"no data either way for {self._idle_timeout:g} s, the idle timeout; the link was aborted",
        )

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
            self._last_data = time.monotonic()
            if self._coalesce is not None and len(data) < self._chunk and self._coalesce(data):
                data += await self._read_soon(self._chunk - len(data))
            try:
                await self._send(data)
            except IsclError:  # a closed link refuses it
                if not self._peer_closed():
                    raise
                raise IsclError(
                    ErrorCode.CONNECTION_LOST,
                    f"the application at {self._plain} sent {len(data)} bytes after the peer disconnected the line",
                ) from None
            self.record.plain_to_iscl += len(data)
        if not self._peer_closed():
            await self._disconnect()

    def _peer_closed(self) -> bool:
        """Whether the peer has disconnected the line (until our own disconnection, a closed link can
        only mean that), whether or not the downstream has taken the end yet."""
        assert self._stream is not None
        return self._stream.connection.state is State.CLOSED

    async def _read_soon(self, limit: int) -> bytes:
        """What the plain side sends within :data:`COALESCE_WAIT`, up to ``limit`` bytes (b"" if nothing)."""
        assert self._reader is not None
        try:
            async with asyncio.timeout(COALESCE_WAIT):  # (not wait_for: see aio._handshake_within)
                return await self._plain_io(self._reader.read(limit))
        except TimeoutError:
            return b""

    async def _iscl_to_plain(self) -> None:
        assert self._writer is not None and self._stream is not None
        while (data := await self._stream.recv()) is not None:
            self._last_data = time.monotonic()
            self._writer.write(data)
            self.record.iscl_to_plain += len(data)
            if self._on_message is not None:
                self._on_message("iscl_to_plain", len(data))
            await self._plain_io(self._writer.drain())
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
                self._chunk = exc.peer_max_length  # remembered for the rest of the link
                data = piece + data
                continue
            if self._on_message is not None:
                self._on_message("plain_to_iscl", len(piece))

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
        """A read or drain on the plain side; its socket errors name the application's side."""
        try:
            return await operation
        except OSError as exc:
            raise _failed(f"the connection with {self._plain}", exc) from None


def _failed(what: str, exc: OSError) -> IsclError:
    """A socket error as one sentence naming the connection (plain side or ISCL side) it broke."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return IsclError(ErrorCode.CONNECTION_LOST, f"{what} failed: {reason}")


__all__ = ["COALESCE_WAIT", "LINGER", "Address", "Link", "LinkRecord", "reset"]
