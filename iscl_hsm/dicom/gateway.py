"""The ISCL gateway (`iscl tunnel`): ISCL in front of unmodified DICOM applications, like stunnel.

A client tunnel accepts plain TCP from local applications and opens one ISCL link per connection; a
server tunnel accepts ISCL links and opens one plain TCP connection per link to the application it
guards. Everything here is asyncio; engine and key-holder work already runs off the event loop in
:mod:`iscl_hsm.transport.aio`, so one slow link or token call holds up no other link.

How a link ends (see :mod:`iscl_hsm.transport.relay` for the relay itself):

* the application ends its stream (EOF): everything read so far goes out, then the ISCL line
  disconnection runs, and the far tunnel half-closes its own application's socket (FIN);
* anything else (a MAC or decryption failure, a failed authentication, a peer or an application that
  drops its connection, a forward target that is down): both plain sockets are reset (RST), so both
  DICOM applications see an aborted association, and nothing after the failure is forwarded.

One INFO line per link is logged when it ends, its fields those of
:meth:`~iscl_hsm.transport.relay.LinkRecord.fields` (docs/gateway.md, "The link line").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..engine import Config, check_key_holder
from ..errors import ErrorCode, IsclError
from ..keyholder.base import KeyHolder
from ..logs import fields
from ..repeats import RepeatFilter, failure_key
from ..transport import aio
from ..transport.admission import Admission, Refused
from ..transport.common import READ_SIZE, Timeouts
from ..transport.relay import DEFAULT_CHUNK, Address, Link, LinkRecord
from .metrics import NoMetrics
from .pdu import announces_data_set

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 10.0

DEFAULT_IDLE_TIMEOUT = 12 * 3600.0
"""Seconds a link may carry no data either way before the gateway aborts it, as stunnel's TIMEOUTidle
does: a peer that vanished without closing (a pulled cable, a crashed host) would otherwise hold its
link, and the application's connection behind it, for ever."""
GATEWAY_TIMEOUTS = Timeouts(idle=None)
"""The ISCL links' own limits; their idle limit is None, since the gateway's counts data both ways."""

LISTEN_BACKLOG = 1024
"""Connections the kernel queues for a tunnel before it accepts them (capped by net.core.somaxconn).
asyncio's 100 let a burst of associations overflow it: the refused connection attempts are retried
only after a second, which made the slowest of 256 simultaneous links wait that long."""


def stopped_reason(drain_timeout: float) -> str:
    """Why a link was cancelled when its tunnel stopped (the link's log line says it)."""
    return f"the tunnel is stopping and the link did not end within the drain timeout of {drain_timeout:g} s"


class Mode(Enum):
    CLIENT = "client"  # plain in, ISCL out
    SERVER = "server"  # ISCL in, plain out


@dataclass(frozen=True)
class TunnelSettings:
    """What one tunnel does: where it listens, where it connects, with which keys and limits."""

    mode: Mode
    listen: Address
    target: Address
    key_holder: KeyHolder
    config: Config
    chunk_size: int = DEFAULT_CHUNK
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    """Seconds to open the outgoing TCP connection and, for a client tunnel, to authenticate."""
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT
    """Seconds without data either way after which a link is aborted; None: never."""
    timeouts: Timeouts = GATEWAY_TIMEOUTS
    """The ISCL links' other timeouts (an answer, a message in progress, disconnection; the handshake
    of links the server tunnel accepts); idle links are the ``idle_timeout``'s, counted both ways."""
    admission: Admission = field(default_factory=Admission)
    """Who may connect, and whether a PROXY protocol header names them (its wait: the handshake timeout)."""


class _Generation:
    """One set of settings and the links that started under it. A reload retires it; its key holder is
    closed once the last of its links has ended, so open links finish on the keys they began with."""

    def __init__(self, settings: TunnelSettings) -> None:
        self.settings = settings
        self._links = 0
        self._retired = False

    def join(self) -> None:
        self._links += 1

    def leave(self) -> None:
        self._links -= 1
        self._close_if_done()

    def retire(self) -> None:
        self._retired = True
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self._retired and not self._links:
            self.settings.key_holder.close()


class Tunnel:
    """One listening tunnel and the links it carries. ``start()``, then ``stop()`` to drain.

    :meth:`reload` gives new links new settings (keys, algorithms, target) while open links finish on
    theirs. ``metrics`` hears of every link (:class:`~iscl_hsm.dicom.metrics.GatewayMetrics`).
    """

    def __init__(self, settings: TunnelSettings, metrics: NoMetrics | None = None) -> None:
        self._generation = _Generation(settings)
        self._metrics = metrics or NoMetrics()
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()
        self._repeats = RepeatFilter()  # failed handshakes and refused connections, per peer host

    @property
    def settings(self) -> TunnelSettings:
        """The settings new links get."""
        return self._generation.settings

    @property
    def address(self) -> Address:
        """Where the tunnel listens (the real port when it was asked for port 0)."""
        assert self._server is not None, "start() the tunnel first"
        host, port = self._server.sockets[0].getsockname()[:2]
        return Address(host, port)

    @property
    def active_links(self) -> int:
        """Connections being served: authenticating or carried."""
        return len(self._links)

    async def start(self, sock: socket.socket | None = None) -> Address:
        """Listen on the settings' address, or on ``sock`` (bound and listening, e.g. shared by several
        worker processes); links are served in the background until :meth:`stop`."""
        s = self.settings
        check_key_holder(s.config, s.key_holder)  # a hopeless setting fails now, not on every link
        if s.mode is Mode.CLIENT:
            accept, limit = self._accept_plain, 2 * s.chunk_size
        else:
            accept, limit = self._accept_iscl, READ_SIZE
        if sock is None:
            self._server = await asyncio.start_server(accept, s.listen.host, s.listen.port, limit=limit,
                                                      backlog=LISTEN_BACKLOG)  # fmt: skip
        else:
            self._server = await asyncio.start_server(accept, sock=sock, limit=limit, backlog=LISTEN_BACKLOG)
        return self.address

    def reload(self, settings: TunnelSettings) -> None:
        """New links use ``settings`` (checked first: a hopeless one raises KeyHolderError and changes
        nothing); open links finish on the settings they started with."""
        check_key_holder(settings.config, settings.key_holder)
        old, self._generation = self._generation, _Generation(settings)
        old.retire()

    def stop_accepting(self) -> None:
        """Close the listening socket: new connections are refused from now on."""
        if self._server is not None:
            self._server.close()

    async def stop(self, drain_timeout: float) -> int:
        """Stop accepting, let open links finish for ``drain_timeout`` seconds, then abort the rest.

        Returns how many links had to be aborted.
        """
        self.stop_accepting()
        if not self._links:
            return 0
        _, pending = await asyncio.wait(set(self._links), timeout=drain_timeout)
        for task in pending:
            task.cancel(stopped_reason(drain_timeout))
        await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)

    # --- one link ---------------------------------------------------------------------------------

    async def _accept_plain(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Client tunnel: a local application connected; open its ISCL link."""
        with self._carrying() as s:
            if (source := await self._admit(s, reader, writer)) is None:
                return
            link = self._new_link(s, source, s.target, plain=source, iscl=s.target)
            link.attach_plain(reader, writer)
            await self._run(link, self._open_iscl(s, link))

    async def _accept_iscl(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Server tunnel: authenticate the ISCL client, then connect to the application it reaches."""
        with self._carrying() as s:
            if (peer := await self._admit(s, reader, writer)) is None:
                return
            stream = await aio.accept_link(reader, writer, key_holder=s.key_holder, config=s.config, timeouts=s.timeouts,
                                           on_error=self._handshake_failed, peer=(peer.host, peer.port))  # fmt: skip
            if stream is None:
                return
            self._metrics.handshake(stream.handshake_seconds)
            source = Address.of(stream.peer)
            link = self._new_link(s, source, s.target, plain=s.target, iscl=source)
            link.attach_iscl(stream)
            await self._run(link, self._open_plain(s, link))

    async def _admit(
        self, s: TunnelSettings, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Address | None:
        """The peer to name a new connection by (see Admission.peer); None once it is closed: refused
        (logged, rate limited) or the load balancer's health check."""
        try:
            peer = await s.admission.peer(reader, writer, s.timeouts.handshake)
        except Refused as exc:
            self._log_failure(exc.peer, exc)
            peer = None
        if peer is None:
            writer.close()
        return peer

    @contextlib.contextmanager
    def _carrying(self) -> Iterator[TunnelSettings]:
        """Serve one connection under the current settings, registered so that :meth:`stop` can wait for
        it or abort it, and so that a reload closes its key holder only after it."""
        task = asyncio.current_task()
        assert task is not None
        generation = self._generation
        generation.join()
        self._links.add(task)
        try:
            yield generation.settings
        except asyncio.CancelledError:
            pass  # stop() gave up on it: Link.run has aborted and logged it. (Nobody awaits this task, and
            # Python 3.11's start_server would print a cancelled one as an error with a traceback.)
        finally:
            self._links.discard(task)
            generation.leave()

    def _new_link(self, s: TunnelSettings, source: Address, target: Address, *, plain: Address, iscl: Address) -> Link:
        """A link from ``source`` to ``target`` that logs its line on the gateway's logger."""
        return Link(
            LinkRecord(source, target), plain=plain, iscl=iscl, chunk_size=s.chunk_size, idle_timeout=s.idle_timeout,
            logger=log, coalesce=announces_data_set, on_message=self._metrics.message,
        )

    async def _run(self, link: Link, connect: Awaitable[None]) -> None:
        self._metrics.link_started()
        error = await link.run(connect)
        self._metrics.link_ended(link.record, error)

    async def _open_iscl(self, s: TunnelSettings, link: Link) -> None:
        try:
            async with asyncio.timeout(s.connect_timeout):  # (not wait_for: see aio._handshake_within)
                stream = await aio.open_connection(
                    s.target.host, s.target.port, key_holder=s.key_holder, config=s.config, timeouts=s.timeouts
                )
        except (IsclError, OSError) as exc:
            raise _connect_error(exc, s.target, s.connect_timeout, "ISCL server") from None
        self._metrics.handshake(stream.handshake_seconds)
        link.attach_iscl(stream)

    async def _open_plain(self, s: TunnelSettings, link: Link) -> None:
        try:
            async with asyncio.timeout(s.connect_timeout):
                reader, writer = await asyncio.open_connection(s.target.host, s.target.port, limit=2 * s.chunk_size)
        except OSError as exc:
            raise _connect_error(exc, s.target, s.connect_timeout, "forward target") from None
        link.attach_plain(reader, writer)

    def _handshake_failed(self, peer: tuple[Any, ...] | None, exc: BaseException) -> None:
        self._log_failure(Address.of(peer), exc)

    def _log_failure(self, source: Address, exc: BaseException) -> None:
        """The line of a connection that failed before its link began (refused, or its handshake failed);
        a peer's repeats of the same failure are counted, not shown."""
        self._metrics.link_failed(exc)
        unshown = self._repeats.admit(failure_key(source.host, exc))
        if unshown is None:
            return
        values = LinkRecord(source, self.settings.target, started=None).fields(exc)
        if unshown:
            values["unshown"] = unshown  # like it from the same host, within the last minute
        log.info("link", extra=fields(**values))


def _connect_error(exc: BaseException, target: Address, timeout: float, what: str) -> IsclError:
    """One sentence for an outgoing connection that failed, naming host:port and what to check."""
    if isinstance(exc, TimeoutError):  # (an OSError too)
        hint = "; is it a plain DICOM port instead of an ISCL tunnel?" if what == "ISCL server" else ""
        return IsclError(ErrorCode.CONNECTION_LOST, f"no answer from the {what} {target} within {timeout:g} s{hint}")
    if isinstance(exc, IsclError):
        return exc
    errno = getattr(exc, "errno", None)
    reason = os.strerror(errno) if errno else str(exc) or type(exc).__name__
    return IsclError(ErrorCode.CONNECTION_LOST, f"cannot connect to the {what} {target}: {reason}")


__all__ = ["DEFAULT_CHUNK", "DEFAULT_CONNECT_TIMEOUT", "DEFAULT_IDLE_TIMEOUT", "Address", "LinkRecord", "Mode", "Tunnel", "TunnelSettings", "stopped_reason"]
