"""An authenticated ISCL link joined to one end of a socket pair, for code that wants a plain socket.

pynetdicom polls its socket with ``select()`` and so cannot see bytes a wrapper has already verified
and buffered. The bridge keeps the ISCL link on the real TCP socket in its own thread (an asyncio
loop) and copies verified messages into a :func:`socket.socketpair`; the application gets the other
end, whose readiness ``select()`` reports truthfully.

Failure rule: when the link fails (bad MAC, peer abort, lost connection), the bridge closes the
application's socket at once and writes nothing more to it, so the application sees the connection
drop and never receives a byte that arrived after the failure.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import threading
from collections.abc import Callable

from ..engine import Config, Connection, LinkParameters, Role
from ..errors import ErrorCode, IsclError
from ..keyholder.base import KeyHolder
from ..transport import aio
from ..transport.common import READ_SIZE

LOGGER = logging.getLogger(__name__)

DEFAULT_HANDSHAKE_TIMEOUT = 30.0
_ABORT_GRACE = 5.0  # seconds an aborted handshake may take to notice its socket is gone


class IsclBridge:
    """One ISCL link on a connected TCP socket, relayed to :attr:`app_socket`.

    The constructor runs the handshake and returns once the link is up; it raises
    :class:`~iscl_hsm.errors.IsclError` (and closes ``sock``) if authentication fails or takes longer
    than ``timeout`` seconds. Afterwards :attr:`error` holds the failure that ended the link, if any,
    and ``on_failure(error)`` is called with it (in the bridge's thread).
    """

    def __init__(
        self,
        sock: socket.socket,
        role: Role,
        *,
        key_holder: KeyHolder,
        config: Config | None = None,
        timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        peer: str | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.peer = peer or _address(sock.getpeername())
        self._on_failure = on_failure
        self.local_address: tuple[str, int] = sock.getsockname()[:2]
        self.parameters: LinkParameters | None = None
        self.error: BaseException | None = None
        self.app_socket, self._inner = socket.socketpair()
        self._config = config or Config()
        self._ready: concurrent.futures.Future[LinkParameters] = concurrent.futures.Future()
        self._done = threading.Event()
        connection = Connection(role, key_holder, self._config)
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._run(sock, connection, timeout),), name=f"iscl-bridge {self.peer}",
            daemon=True,
        )  # fmt: skip
        self._thread.start()
        try:
            self.parameters = self._ready.result()
        except BaseException:
            self.app_socket.close()
            self._thread.join()
            raise

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the link has ended (either way); True if it has."""
        return self._done.wait(timeout)

    # --- the bridge thread ----------------------------------------------------------------------

    async def _run(self, sock: socket.socket, connection: Connection, timeout: float | None) -> None:
        try:
            stream = await self._handshake(sock, connection, timeout)
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor's thread
            self._inner.close()
            self._done.set()
            self._ready.set_exception(exc)
            return
        assert stream.parameters is not None  # set by a completed handshake
        self._ready.set_result(stream.parameters)
        try:
            reader, writer = await asyncio.open_connection(sock=self._inner)
            await self._relay(stream, reader, writer)
        finally:
            self._done.set()

    async def _handshake(self, sock: socket.socket, connection: Connection, timeout: float | None) -> aio.IsclStream:
        reader, writer = await asyncio.open_connection(sock=sock)
        stream = aio.IsclStream(reader, writer, connection)
        handshake = asyncio.create_task(stream.handshake())
        try:
            done, _ = await asyncio.wait({handshake}, timeout=timeout)
        except BaseException:
            await stream.abort()
            raise
        if not done:
            # Not cancelled: dropping the socket ends the handshake with an error we collect here.
            await stream.abort()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(handshake, _ABORT_GRACE)
            raise IsclError(
                ErrorCode.CONNECTION_LOST,
                f"no ISCL handshake with {self.peer} within {timeout:g} s: is the peer an ISCL endpoint"
                " (not a plain DICOM port) using the same link options?",
            )
        if handshake.exception() is not None:
            await stream.abort()
            handshake.result()
        return stream

    async def _relay(
        self, stream: aio.IsclStream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Copy both ways until the application closes its socket or the link ends."""
        upstream = asyncio.create_task(self._upstream(stream, reader))
        downstream = asyncio.create_task(self._downstream(stream, writer))
        done, _ = await asyncio.wait({upstream, downstream}, return_when=asyncio.FIRST_COMPLETED)
        failure = next((task.exception() for task in done if task.exception() is not None), None)
        if failure is None and upstream in done:
            # The application closed its socket and we disconnected the line; the peer's last
            # messages (if any) still go to the application before its socket closes.
            failure = await _outcome(downstream)
        if failure is not None:
            self.error = failure
            LOGGER.info("ISCL link with %s failed: %s", self.peer, failure)
            await stream.abort()
            if self._on_failure is not None:
                self._on_failure(failure)
        writer.close()  # the application sees the connection end, and nothing after it
        for task in (upstream, downstream):
            task.cancel()
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await writer.wait_closed()

    async def _upstream(self, stream: aio.IsclStream, reader: asyncio.StreamReader) -> None:
        """Application bytes -> ISCL messages; at the application's end of stream, disconnect the line."""
        limit = min(READ_SIZE, self._config.max_message or READ_SIZE)
        while data := await reader.read(READ_SIZE):
            start = 0
            while start < len(data):
                piece = data[start : start + limit]
                try:
                    await stream.send(piece)
                except aio.MessageRefusedError as exc:
                    if exc.code is not ErrorCode.PEER_LENGTH_TOO_SMALL or not 0 < exc.peer_max_length < len(piece):
                        raise
                    limit = exc.peer_max_length  # the peer's limit, remembered for the rest of the link
                    continue
                start += len(piece)
        await stream.close()

    async def _downstream(self, stream: aio.IsclStream, writer: asyncio.StreamWriter) -> None:
        """Verified ISCL messages -> application bytes, until the line is disconnected."""
        while (data := await stream.recv()) is not None:
            try:
                writer.write(data)
                await writer.drain()
            except OSError:
                return  # the application has gone; its end of stream ends the link (upstream)


async def _outcome(task: asyncio.Task[None]) -> BaseException | None:
    try:
        await task
    except Exception as exc:  # noqa: BLE001 - the caller records it
        return exc
    return None


def _address(address: tuple[object, ...]) -> str:
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


__all__ = ["DEFAULT_HANDSHAKE_TIMEOUT", "IsclBridge"]
