"""A blocking ISCL link over a connected TCP socket: the engine plus a socket, nothing more.

Messages the peer sends while we are sending are kept and returned by later :meth:`IsclSocket.recv`
calls, so one thread can both send and receive. Every read and write is bounded by a
:class:`~iscl_hsm.transport.common.Timeouts` limit, so a silent peer fails the link (128 TIMED_OUT).
"""

from __future__ import annotations

import select
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Self, TypeVar

from .. import wire
from ..engine import (
    Closed,
    CloseRefused,
    Config,
    Connection,
    Event,
    LinkParameters,
    LinkReady,
    MessageReceived,
    MessageRefused,
    MessageSent,
    NonSecureReceived,
    Role,
    State,
)
from ..errors import ErrorCode, IsclError, LocalProtocolError, RemoteProtocolError
from ..keyholder.base import KeyHolder
from .common import DEFAULT_TIMEOUTS, READ_SIZE, Address, MessageRefusedError, Timeouts, refused_error

T = TypeVar("T")


class IsclSocket:
    """One secured link. Create it with :meth:`connect` or :meth:`accept`."""

    def __init__(self, sock: socket.socket, conn: Connection, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> None:
        self._sock = sock
        self._conn = conn
        self._timeouts = timeouts
        self._timeout: float | None = -1.0  # the socket's timeout as last set (settimeout costs a system call)
        self._handshake_ends: float | None = None  # time.monotonic() by which the handshake must be over
        self._inbox: deque[Event] = deque()
        self._failure: IsclError | None = None  # raised once the messages before it are taken
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self.parameters: LinkParameters | None = None

    @classmethod
    def connect(
        cls,
        host: str,
        port: int = wire.DEFAULT_PORT,
        *,
        key_holder: KeyHolder,
        config: Config | None = None,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
    ) -> IsclSocket:
        """Connect as the ISCL client (within the handshake timeout) and authenticate."""
        sock = socket.create_connection((host, port), timeout=timeouts.handshake)
        return cls.client(sock, key_holder=key_holder, config=config, timeouts=timeouts)

    @classmethod
    def client(
        cls,
        sock: socket.socket,
        *,
        key_holder: KeyHolder,
        config: Config | None = None,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
    ) -> IsclSocket:
        """Run the client side of the handshake on a connected socket."""
        return cls._handshake(sock, _engine(sock, Role.CLIENT, key_holder, config), timeouts)

    @classmethod
    def accept(
        cls,
        sock: socket.socket,
        *,
        key_holder: KeyHolder,
        config: Config | None = None,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
    ) -> IsclSocket:
        """Run the server side of the handshake on an accepted socket."""
        conn = _engine(sock, Role.SERVER, key_holder, config)
        conn.initiate()
        return cls._handshake(sock, conn, timeouts)

    @classmethod
    def _handshake(cls, sock: socket.socket, conn: Connection, timeouts: Timeouts) -> IsclSocket:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = cls(sock, conn, timeouts)
        if timeouts.handshake is not None:
            link._handshake_ends = time.monotonic() + timeouts.handshake
        try:
            while link.parameters is None:
                link._flush()
                link._read_events()
            link._flush()
        except BaseException:
            link._abort()
            raise
        link._handshake_ends = None
        return link

    @property
    def connection(self) -> Connection:
        return self._conn

    def send(self, data: bytes) -> None:
        """Send one secured message; returns once every block is on the wire.

        Raises :class:`MessageRefusedError` if the peer answers NAK (the link stays up).
        """
        self._guard(self._conn.send_message, data)
        while True:
            self._flush()
            event = self._take(MessageSent, MessageRefused)
            if isinstance(event, MessageRefused):
                raise refused_error(event)
            if event is not None:
                self._flush()
                return
            self._read_events()

    def send_non_secure(self, data: bytes) -> None:
        """Send through-mode (unprotected) data; both ends must have enabled through mode."""
        self._guard(self._conn.send_non_secure, data)
        self._flush()

    def recv(self) -> bytes | None:
        """The next verified message (or through-mode data); None once the peer has disconnected."""
        while True:
            event = self._take(MessageReceived, NonSecureReceived, Closed)
            if isinstance(event, MessageReceived | NonSecureReceived):
                return event.data
            if event is not None:
                self._flush()
                self._sock.close()
                return None
            self._read_events()

    def close(self) -> None:
        """Run the line disconnection protocol, then close the socket.

        Raises :class:`RemoteProtocolError` with code PEER_REFUSED_CLOSE if the peer refuses.
        """
        self._guard(self._conn.close)
        while True:
            self._flush()
            event = self._take(Closed, CloseRefused)
            if isinstance(event, CloseRefused):
                raise RemoteProtocolError(ErrorCode.PEER_REFUSED_CLOSE, "the peer refused to disconnect the line")
            if event is not None:
                self._sock.close()
                return
            self._read_events()

    def abort(self) -> None:
        """Drop the link without the disconnection protocol (CloseForced in the SDK)."""
        self._abort()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sock.fileno() != -1:
            self._abort()

    # --- internals ------------------------------------------------------------------------------

    def _read_events(self) -> None:
        if self._failure is not None:
            raise self._failure
        while not self._poll.poll(0) and self._guard(self._conn.seal_ahead):
            pass  # the sender keeps sealing its requested message until the peer's answer arrives
        data = self._recv()
        try:
            events = self._guard(self._conn.receive_data, data)
        except IsclError as exc:
            # Messages verified before the failure are still delivered; the error comes after them.
            kinds = MessageReceived | NonSecureReceived
            events = [e for e in getattr(exc, "events", ()) if isinstance(e, kinds)]
            if not events:
                raise
            self._failure = exc
        else:
            self._flush()  # answers (RP, RNDNO_RP) go out at once
        for event in events:
            if isinstance(event, LinkReady):
                self.parameters = event.parameters
            else:
                self._inbox.append(event)

    def _take(self, *kinds: type) -> Event | None:
        """Remove and return the oldest queued event of one of ``kinds``."""
        for event in self._inbox:
            if isinstance(event, kinds):
                self._inbox.remove(event)
                return event
        return None

    def _recv(self) -> bytes:
        """The next bytes from the peer, within the timeout of what the engine waits for."""
        waiting = self._conn.waiting
        limit = self._timeouts.of(waiting)
        if self._handshake_ends is not None:
            limit = max(0.0, self._handshake_ends - time.monotonic())
        self._set_timeout(limit)
        try:
            return self._sock.recv(READ_SIZE)
        except TimeoutError:
            error = self._timeouts.expired(waiting, self._peer_name())
            self._abort()
            raise error from None

    def _flush(self) -> None:
        self._set_timeout(self._timeouts.message)
        try:
            while out := self._conn.data_to_send():
                self._sock.sendall(out)
        except TimeoutError:
            error = self._timeouts.stalled(self._peer_name())
            self._abort()
            raise error from None
        self._guard(self._conn.prepare)

    def _set_timeout(self, limit: float | None) -> None:
        if limit != self._timeout:
            self._sock.settimeout(limit)
            self._timeout = limit

    def _peer_name(self) -> str:
        try:
            return f"the peer {Address.of(self._sock.getpeername())}"
        except OSError:
            return "the peer"

    def _guard(self, fn: Callable[..., T], *args: Any) -> T:
        """Run an engine call; if it killed the link, tell the peer what we can, then drop the socket.

        A local refusal (a message over our own limit, a call in the wrong state) leaves the link up.
        """
        if self._failure is not None:
            raise self._failure
        try:
            return fn(*args)
        except IsclError as exc:
            if not isinstance(exc, LocalProtocolError) or self._conn.state is State.ERROR:
                self._abort()
            raise

    def _abort(self) -> None:
        try:
            out = self._conn.data_to_send()
            if out:
                self._sock.sendall(out)
        except (OSError, IsclError):
            pass
        self._sock.close()


def _engine(sock: socket.socket, role: Role, key_holder: KeyHolder, config: Config | None) -> Connection:
    """The engine of a new link; the socket is closed if there can be none (the peer is not left waiting)."""
    try:
        return Connection(role, key_holder, config)
    except BaseException:
        sock.close()
        raise


__all__ = ["IsclSocket", "MessageRefusedError"]
