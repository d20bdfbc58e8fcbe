"""An asyncio ISCL link over reader/writer streams.

Engine calls that may wait on a token or a card (the handshake, unique session keys, record keys
kept in a token) run in a worker thread. Record protection runs on the event loop, in steps of at
most :data:`~iscl_hsm.transport.common.READ_SIZE` bytes in and :data:`FLUSH_BYTES` out: a step is a
few milliseconds of DES at most, so other links on the loop wait little, and a busy link goes
without the thread hand-over per step that (on a machine whose cores are all busy) costs a
scheduling delay each time, which once cost the gateway a fifth of its DES rate. One lock per link
keeps engine calls and the writes of their output in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from .. import wire
from ..engine import (
    Closed,
    CloseRefused,
    Config,
    Connection,
    LinkParameters,
    LinkReady,
    MessageReceived,
    MessageRefused,
    MessageSent,
    NonSecureReceived,
    Role,
    State,
    Waiting,
    check_key_holder,
)
from ..errors import ErrorCode, IsclError, LocalProtocolError, RemoteProtocolError
from ..keyholder.base import KeyHolder
from .common import DEFAULT_TIMEOUTS, READ_SIZE, Address, MessageRefusedError, Timeouts, refused_error

T = TypeVar("T")

FLUSH_BYTES = 64 * 1024
"""Sealed output produced per engine visit before the writer is drained (a step's length, see above)."""

Write = Callable[[bytes], None]

Outcome = MessageSent | MessageRefused | Closed | CloseRefused
"""The peer's answer to one of our requests (a message's, or the line disconnection's)."""

HANDSHAKE_TIMEOUT = Timeouts.handshake
"""Seconds a handshake may take before the link is dropped (a card may need a few of them)."""


class _Inbox:
    """Verified messages (None: the end) until ``recv()`` takes them, for one reader at a time.

    What an asyncio.Queue does here without what the link never uses: its getter and putter deques
    and its Event cost about 2.3 KB a link end, a quarter of a tunnel pair's memory per link beyond
    the sockets.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[bytes | None] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: bytes | None) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> bytes | None:
        if self._waiter is not None:
            raise LocalProtocolError(ErrorCode.BAD_STATE, "recv() is already waiting on this link; read from one task")
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class IsclStream:
    """One secured link. Create it with :func:`open_connection` or through :func:`start_server`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: Connection,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        peer: Any = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._conn = conn
        self._timeouts = timeouts
        self._peer = peer  # the real client a load balancer named, if any (see accept_link)
        self._expires: float | None = None  # when what the link waits for is overdue (loop time), see _rearm()
        self._watchdog: asyncio.TimerHandle | None = None
        self._lock = asyncio.Lock()
        self._received = _Inbox()
        self._answers: list[asyncio.Future[Outcome]] = []  # one per request awaiting its answer, see _request()
        # (lists, not deques, for the few items a link queues: an empty deque is 0.7 KB, an empty list 56 B)
        self._loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[LinkParameters] = self._loop.create_future()
        # A cancelled handshake() leaves nobody awaiting the failure; it is still raised by recv().
        self._ready.add_done_callback(lambda ready: ready.cancelled() or ready.exception())
        self._failure: BaseException | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self.parameters: LinkParameters | None = None
        self.handshake_seconds: float | None = None
        """How long the handshake took, once it succeeded (from its first byte out or in)."""
        self.closed_by_peer = False
        """True once the peer started a line disconnection that completed (V1.00 cannot authenticate it)."""
        self._incoming = select.poll()  # tells whether the peer's answer has come, see _seal_until_answered()
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._incoming.register(sock.fileno(), select.POLLIN)

    @property
    def connection(self) -> Connection:
        return self._conn

    @property
    def timeouts(self) -> Timeouts:
        return self._timeouts

    @property
    def peer(self) -> Any:
        """The peer's (host, port, ...): the socket's, or the one ``accept_link`` was told."""
        return self._peer or self._writer.get_extra_info("peername")

    async def handshake(self) -> LinkParameters:
        """Authenticate; afterwards a background task reads and verifies incoming messages."""
        if self._conn.role is Role.SERVER:
            await self._call(self._conn.initiate)
        self._pump_task = asyncio.create_task(self._pump())
        self.parameters = await asyncio.shield(self._ready)
        return self.parameters

    async def send(self, data: bytes) -> None:
        """Send one secured message; raises :class:`MessageRefusedError` on NAK."""
        answer = await self._request(self._conn.send_message, data)  # (prepare() seals its start ahead)
        assert answer is not None  # (send_message raises rather than decline)
        with _abandoned_on_failure(answer):
            await self._seal_until_answered(answer)
            outcome = await self._answer(answer)
        if isinstance(outcome, MessageRefused):
            raise refused_error(outcome)
        await self._flush_all()

    async def send_non_secure(self, data: bytes) -> None:
        await self._call(self._conn.send_non_secure, data)

    async def recv(self) -> bytes | None:
        """The next verified message; None once the line is disconnected (by either end).

        Raises the link's error if it failed (after the messages verified before the failure).
        """
        data = await self._received.get()
        if data is None:
            self._received.put(None)
            self._raise_failure()
        return data

    async def close(self) -> None:
        """Line disconnection protocol, then close the socket (just that if the peer disconnected first)."""
        if (answer := await self._request(self._start_close)) is None:
            await self._shutdown()
            return
        with _abandoned_on_failure(answer):
            outcome = await self._answer(answer)
        if isinstance(outcome, CloseRefused):
            raise RemoteProtocolError(ErrorCode.PEER_REFUSED_CLOSE, "the peer refused to disconnect the line")
        await self._shutdown()

    async def abort(self) -> None:
        """Drop the link at once (CloseForced in the SDK)."""
        await self._shutdown()

    # --- internals ------------------------------------------------------------------------------

    def _start_close(self) -> bool:
        """Ask to disconnect, unless the peer's disconnection was accepted meanwhile (the pump runs on)."""
        if self._conn.state is State.CLOSED:
            return False
        self._conn.close()
        return True

    async def _request(self, fn: Callable[..., object], *args: Any) -> asyncio.Future[Outcome] | None:
        """Make a request the peer answers; the future its answer will resolve, None if ``fn``
        declined to make one (returned False: a close after the peer's own)."""
        answer: asyncio.Future[Outcome] = self._loop.create_future()
        try:
            made = await self._call(fn, *args, answer=answer)
        except BaseException:
            # Nobody will await it (a write that failed on a reset, say): cancelled, it keeps its place
            # among the answers and takes neither an answer nor the link's error, which asyncio would
            # otherwise print as never retrieved.
            answer.cancel()
            raise
        return None if made is False else answer

    async def _call(self, fn: Callable[..., T], *args: Any, answer: asyncio.Future[Outcome] | None = None) -> T:
        """One engine call, the output it produced and the work it deferred, in order.

        With ``answer``, the call is a request the peer will answer (see :meth:`_request`): unless
        ``fn`` raises or declines, ``answer`` joins the queue of answers right there, under the lock,
        so that answers reach the callers that asked even when several send at once.
        """
        result, wrote = await self._locked_step(fn, *args, answer=answer)
        if wrote:  # (draining a writer the pump has closed would raise)
            await self._drain()
        return result

    async def _locked_step(
        self, fn: Callable[..., T], *args: Any, answer: asyncio.Future[Outcome] | None = None
    ) -> tuple[T, bool]:
        """:meth:`_step` under the lock, unless the link has failed; its result, and whether it wrote."""
        async with self._lock:
            self._raise_failure()  # (the link may have failed while this call waited for the lock)
            done = await self._engine(lambda write: self._step(write, fn, *args, answer=answer))
            self._rearm()
            return done

    def _step(
        self, write: Write, fn: Callable[..., T], *args: Any, answer: asyncio.Future[Outcome] | None = None
    ) -> tuple[T, bool]:
        """Call the engine, write its output, then run what it deferred (it overlaps with the peer)."""
        result = fn(*args)
        if answer is not None and result is not False:
            self._answers.append(answer)  # (appends are atomic: this may run in a worker thread)
        out = self._conn.data_to_send()
        if out:
            write(out)
        self._conn.prepare()
        return result, bool(out)

    async def _engine(self, work: Callable[[Write], T]) -> T:
        """``work(write)`` in a worker thread if it may wait on the key holder, else on the event loop.

        Cancelled meanwhile (the link being aborted), it still waits for the thread to finish before it
        lets the cancellation through: the caller holds the link's lock, and the next engine call must
        not run while this one still does (two at once corrupt the engine's state).
        """
        if not self._conn.may_block:
            return work(self._writer.write)
        call = asyncio.ensure_future(asyncio.to_thread(work, self._threadsafe_write))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            await asyncio.wait({call})
            call.exception()  # (taken: the link is being aborted, so how the call ended no longer matters)
            raise

    def _threadsafe_write(self, data: bytes) -> None:
        """Write from a worker thread: queued on the loop ahead of the thread's own completion."""
        self._loop.call_soon_threadsafe(self._writer.write, data)

    def _rearm(self) -> None:
        """Give the peer the timeout of what the engine waits for after this step, from now.

        Called after every engine step (every read among them). Lazy, since it runs thousands of
        times a second on a busy link: it moves a deadline, and the one timer of the link is
        rescheduled only when the deadline comes earlier (a request on an idle link); a timer that
        fires before the deadline just sets itself again. The handshake is bounded as a whole
        instead (:func:`_handshake_within`).
        """
        waiting = self._conn.waiting
        limit = None if waiting is Waiting.HANDSHAKE else self._timeouts.of(waiting)
        if limit is None:
            self._expires = None
            return
        self._expires = self._loop.time() + limit
        if self._watchdog is None or self._watchdog.when() > self._expires:
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._watchdog = self._loop.call_at(self._expires, self._watch)

    def _watch(self) -> None:
        """The watchdog's timer: fail the link if its deadline has passed, else wait on."""
        self._watchdog = None
        if self._expires is None or self._writer.is_closing():
            return
        if self._loop.time() < self._expires:
            self._watchdog = self._loop.call_at(self._expires, self._watch)
            return
        waiting = self._conn.waiting
        if waiting is Waiting.NOTHING:
            return  # the engine ended meanwhile (in a worker thread): that call reports how
        self._failure = self._failure or self._timeouts.expired(waiting, self._peer_name())
        self._writer.transport.abort()  # the pump's read ends, and it reports self._failure

    async def _drain(self) -> None:
        """Wait until the writer may take more, at most the message timeout (a peer that reads nothing)."""
        transport = self._writer.transport
        if transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[1]:
            await self._writer.drain()  # (returns at once: it would not wait; it raises a lost connection's error)
            return
        try:
            async with asyncio.timeout(self._timeouts.message):
                await self._writer.drain()
        except TimeoutError:
            self._failure = self._failure or self._timeouts.stalled(self._peer_name())
            transport.abort()  # the pump then ends too, and nobody waits on this link
            raise self._failure from None

    def _peer_name(self) -> str:
        return f"the peer {Address.of(self.peer)}"

    async def _flush_all(self) -> None:
        """Write the rest of an outgoing message, :data:`FLUSH_BYTES` at a time."""
        while True:
            async with self._lock:
                wrote = await self._engine(self._seal_some)
            if not wrote:
                return
            await self._drain()

    async def _seal_until_answered(self, answer: asyncio.Future[Outcome]) -> None:
        """Seal more of the requested message until the peer's answer comes, as the blocking transport does.

        The peer answers once it has worked through the previous message, a batch or two behind us:
        without this the sender would sit idle that long on every message. Each step is short, and
        the loop stops as soon as anything arrives, so the pump reads the answer one step later at most.
        """
        assert self._pump_task is not None
        while not (answer.done() or self._pump_task.done() or self._incoming.poll(0)):
            async with self._lock:
                if not await self._engine(lambda _write: self._conn.seal_ahead()):
                    return
            await asyncio.sleep(0)  # (the pump, and every other link on the loop, run in between)

    def _seal_some(self, write: Write) -> int:
        wrote = 0
        while wrote < FLUSH_BYTES and (out := self._conn.data_to_send()):
            write(out)
            wrote += len(out)
        return wrote

    async def _answer(self, answer: asyncio.Future[Outcome]) -> Outcome:
        """The peer's answer to a request, once the pump has it; the link's error if it ends first.

        A plain future the pump resolves: a queue read raced against the pump task with
        ``asyncio.wait`` cost every message a task and a handful of callbacks.
        """
        assert self._pump_task is not None
        if not answer.done() and self._pump_task.done():
            raise self._lost()
        return await answer

    def _deliver_outcome(self, outcome: Outcome) -> None:
        """To the request it answers: the oldest one (answers come in the order of the requests).

        A caller that stopped waiting (cancelled) leaves its slot, and the answer is dropped with it.
        """
        if self._answers and not (answer := self._answers.pop(0)).done():
            answer.set_result(outcome)

    def _lost(self) -> BaseException:
        """Why no answer will come: the link's failure, or the end of the link."""
        return self._failure or RemoteProtocolError(
            ErrorCode.CONNECTION_LOST, "the link ended before the peer answered"
        )

    async def _pump(self) -> None:
        try:
            await self._pump_events()
        finally:  # whoever waits for an answer now learns that none will come
            for answer in self._answers:
                if not answer.done():
                    answer.set_exception(self._lost())
            self._answers.clear()

    async def _pump_events(self) -> None:
        try:
            while True:
                data = await self._reader.read(READ_SIZE)
                events, wrote = await self._locked_step(self._conn.receive_data, data)
                for event in events:
                    if isinstance(event, LinkReady):
                        self._ready.set_result(event.parameters)
                    elif isinstance(event, MessageReceived | NonSecureReceived):
                        self._received.put(event.data)
                    elif isinstance(event, Closed) and event.by_peer:
                        self.closed_by_peer = True
                        await self._shutdown()
                        self._received.put(None)
                        return
                    else:
                        self._deliver_outcome(event)  # type: ignore[arg-type]
                    if isinstance(event, Closed):
                        self._received.put(None)  # a recv() waiting now or later returns None
                        return
                if wrote:  # after the events: a reset met here cannot take back what was verified
                    await self._drain()
        except (IsclError, OSError) as exc:
            for event in getattr(exc, "events", ()):  # verified before the failure: still delivered
                if isinstance(event, MessageReceived | NonSecureReceived):
                    self._received.put(event.data)
            self._failure = self._failure or exc  # (a timeout or a stalled writer may have come first)
            if not self._ready.done():
                self._ready.set_exception(self._failure)
            self._received.put(None)
            async with self._lock:
                out = self._conn.data_to_send()  # a NAK that says why, if any
                if out:
                    self._writer.write(out)
            await self._shutdown()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def _shutdown(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass


@contextlib.contextmanager
def _abandoned_on_failure(answer: asyncio.Future[Outcome]) -> Iterator[None]:
    """A caller that stops waiting for ``answer`` (cancelled, say, by SIGTERM) cancels it: nobody
    awaits it any more, and the link's error put on it later would be printed by asyncio as "Future
    exception was never retrieved"."""
    try:
        yield
    except BaseException:
        answer.cancel()
        raise


async def open_connection(
    host: str,
    port: int = wire.DEFAULT_PORT,
    *,
    key_holder: KeyHolder,
    config: Config | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
) -> IsclStream:
    """Connect as the ISCL client and authenticate (within ``timeouts.handshake`` seconds)."""
    reader, writer = await asyncio.open_connection(host, port, limit=READ_SIZE)
    return await _authenticated(reader, writer, Role.CLIENT, key_holder, config, timeouts)


async def handshake_on(
    sock: socket.socket,
    role: Role,
    *,
    key_holder: KeyHolder,
    config: Config | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
) -> IsclStream:
    """Authenticate on a TCP socket connected or accepted elsewhere; it is closed if that fails."""
    reader, writer = await asyncio.open_connection(sock=sock, limit=READ_SIZE)
    return await _authenticated(reader, writer, role, key_holder, config, timeouts)


async def _authenticated(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    role: Role,
    key_holder: KeyHolder,
    config: Config | None,
    timeouts: Timeouts,
) -> IsclStream:
    try:
        conn = Connection(role, key_holder, config)
    except BaseException:
        writer.close()  # the peer is not left waiting for a handshake that cannot come
        raise
    stream = IsclStream(reader, writer, conn, timeouts)
    try:
        await _handshake_within(stream)
    except BaseException:
        await stream.abort()
        raise
    return stream


async def start_server(
    handler: Callable[[IsclStream], Awaitable[None]],
    host: str | None,
    port: int,
    *,
    key_holder: KeyHolder,
    config: Config | None = None,
    on_error: Callable[[tuple[Any, ...] | None, BaseException], None] | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    backlog: int = 100,
) -> asyncio.Server:
    """Accept ISCL links; ``handler`` gets each authenticated stream.

    A handshake that fails, or does not finish within ``timeouts.handshake`` seconds (a silent or
    non-ISCL client), goes to ``on_error(peer, error)`` and its connection is dropped. ``backlog``
    is the listening socket's queue of connections not yet accepted (asyncio's default). A key holder
    that can never serve ``config`` raises KeyHolderError here, before anything listens.
    """
    check_key_holder(config or Config(), key_holder)

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = await accept_link(reader, writer, key_holder=key_holder, config=config, timeouts=timeouts, on_error=on_error)
        if stream is None:
            return
        try:
            await handler(stream)
        except asyncio.CancelledError:
            await stream.abort()  # quietly, as in accept_link

    return await asyncio.start_server(accept, host, port, limit=READ_SIZE, backlog=backlog)


async def accept_link(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    key_holder: KeyHolder,
    config: Config | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    on_error: Callable[[tuple[Any, ...] | None, BaseException], None] | None = None,
    peer: tuple[str, int] | None = None,
) -> IsclStream | None:
    """The server's handshake on a connection accepted elsewhere: the authenticated stream, or None once
    the failure went to ``on_error(peer, error)`` and the connection was dropped. ``peer`` names the
    client when the socket's peer is not it (a load balancer's PROXY protocol header named it).

    Cancelled (the event loop ending), it aborts the connection quietly and returns None: Python 3.11's
    start_server would log a cancelled task as an error, with a traceback, and nobody else awaits it.
    """
    stream = IsclStream(reader, writer, Connection(Role.SERVER, key_holder, config), timeouts, peer)
    try:
        await _handshake_within(stream)
    except (IsclError, OSError) as exc:
        if on_error is not None:
            on_error(stream.peer, exc)
        await stream.abort()
        return None
    except asyncio.CancelledError:
        await stream.abort()
        return None
    return stream


async def _handshake_within(stream: IsclStream) -> LinkParameters:
    """The handshake, bounded by ``asyncio.timeout``: Python 3.11's ``wait_for`` would drop a
    cancellation (SIGTERM) that arrives in the loop turn in which the handshake completes."""
    timeout = stream.timeouts.handshake
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            parameters = await stream.handshake()
    except TimeoutError:
        raise RemoteProtocolError(
            ErrorCode.TIMED_OUT,
            f"no ISCL handshake with {Address.of(stream.peer)} within {timeout:g} s: is the peer an ISCL"
            " endpoint with the same link options? (--handshake-timeout sets the limit)",
        ) from None
    stream.handshake_seconds = time.monotonic() - started
    return parameters


__all__ = [
    "HANDSHAKE_TIMEOUT",
    "IsclStream",
    "MessageRefusedError",
    "Timeouts",
    "accept_link",
    "handshake_on",
    "open_connection",
    "start_server",
]
