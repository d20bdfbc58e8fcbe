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

One INFO line per link is logged when it ends (:class:`~iscl_hsm.transport.relay.LinkRecord`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..engine import Config, check_key_holder
from ..errors import ErrorCode, IsclError
from ..keyholder.base import KeyHolder
from ..repeats import RepeatFilter
from ..transport import aio
from ..transport.admission import Admission, Refused
from ..transport.common import Timeouts
from ..transport.relay import DEFAULT_CHUNK, Address, Link, LinkRecord
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


class Tunnel:
    """One listening tunnel and the links it carries. ``start()``, then ``stop()`` to drain."""

    def __init__(self, settings: TunnelSettings) -> None:
        self.settings = settings
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()
        self._repeats = RepeatFilter()  # failed handshakes and refused connections, per peer host

    @property
    def address(self) -> Address:
        """Where the tunnel listens (the real port when it was asked for port 0)."""
        assert self._server is not None, "start() the tunnel first"
        host, port = self._server.sockets[0].getsockname()[:2]
        return Address(host, port)

    @property
    def active_links(self) -> int:
        return len(self._links)

    async def start(self) -> Address:
        """Listen; links are served in the background until :meth:`stop`."""
        s = self.settings
        check_key_holder(s.config, s.key_holder)  # a hopeless setting fails now, not on every link
        if s.mode is Mode.CLIENT:
            self._server = await asyncio.start_server(
                self._accept_plain, s.listen.host, s.listen.port, limit=2 * s.chunk_size, backlog=LISTEN_BACKLOG
            )
        else:
            self._server = await aio.start_server(
                self._accept_iscl, s.listen.host, s.listen.port,
                key_holder=s.key_holder, config=s.config, on_error=self._handshake_failed, timeouts=s.timeouts,
                backlog=LISTEN_BACKLOG, admit=self._admit,
            )  # fmt: skip
        return self.address

    async def stop(self, drain_timeout: float) -> int:
        """Stop accepting, let open links finish for ``drain_timeout`` seconds, then abort the rest.

        Returns how many links had to be aborted.
        """
        if self._server is not None:
            self._server.close()
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
        if (peer := await self._admit(reader, writer)) is None:
            writer.close()
            return
        source = Address.of(peer)
        target = self.settings.target
        link = self._new_link(source, target, plain=source, iscl=target)
        link.attach_plain(reader, writer)
        await self._serve(link, self._open_iscl(link))

    async def _accept_iscl(self, stream: aio.IsclStream) -> None:
        """Server tunnel: an ISCL client authenticated; connect to the application it reaches."""
        target = self.settings.target
        source = Address.of(stream.peer)
        link = self._new_link(source, target, plain=target, iscl=source)
        link.attach_iscl(stream)
        await self._serve(link, self._open_plain(link))

    async def _admit(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[str, int] | None:
        """The peer to name a new connection by (see Admission.peer); None to drop it: refused (logged,
        rate limited), the load balancer's health check, or the tunnel stopping meanwhile."""
        try:
            peer = await self.settings.admission.peer(reader, writer, self.settings.timeouts.handshake)
        except Refused as exc:
            self._log_failure(exc.peer, exc)
            return None
        except asyncio.CancelledError:
            return None  # (nobody awaits this task; see _serve)
        return None if peer is None else (peer.host, peer.port)

    def _new_link(self, source: Address, target: Address, *, plain: Address, iscl: Address) -> Link:
        """A link from ``source`` to ``target`` that logs its line on the gateway's logger."""
        s = self.settings
        return Link(
            LinkRecord(source, target), plain=plain, iscl=iscl, chunk_size=s.chunk_size, idle_timeout=s.idle_timeout,
            logger=log, coalesce=announces_data_set,
        )

    async def _serve(self, link: Link, connect: Awaitable[None]) -> None:
        """Run one link, registered so that :meth:`stop` can wait for it or abort it."""
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        try:
            await link.run(connect)
        except asyncio.CancelledError:
            pass  # stop() gave up on it: Link.run has aborted and logged it. (Nobody awaits this task, and
            # Python 3.11's start_server would print a cancelled one as an error with a traceback.)
        finally:
            self._links.discard(task)

    async def _open_iscl(self, link: Link) -> None:
        s = self.settings
        try:
            stream = await asyncio.wait_for(
                aio.open_connection(
                    s.target.host, s.target.port, key_holder=s.key_holder, config=s.config, timeouts=s.timeouts
                ),
                s.connect_timeout,
            )
        except (IsclError, OSError) as exc:
            raise _connect_error(exc, s.target, s.connect_timeout, "ISCL server") from None
        link.attach_iscl(stream)

    async def _open_plain(self, link: Link) -> None:
        s = self.settings
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(s.target.host, s.target.port, limit=2 * s.chunk_size),
                s.connect_timeout,
            )
        except OSError as exc:
            raise _connect_error(exc, s.target, s.connect_timeout, "forward target") from None
        link.attach_plain(reader, writer)

    def _handshake_failed(self, peer: tuple[Any, ...] | None, exc: BaseException) -> None:
        self._log_failure(Address.of(peer), exc)

    def _log_failure(self, source: Address, exc: BaseException) -> None:
        """The line of a connection that failed before its link began; repeats from one host are counted."""
        line = self._repeats.failure(source.host, exc, LinkRecord(source, self.settings.target, started=None).line(exc))
        if line is not None:
            log.info("%s", line)


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
