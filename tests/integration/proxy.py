"""A man in the middle between ISCL ends: a TCP relay that cuts each direction into ISCL frames.

:class:`FrameProxy` accepts any number of connections and relays each to the server; a *handler*
sees every complete frame (a 32-byte header, DataLength at offset 8, then the payload) and decides
what its receiver gets instead, through the :class:`Link` it is given: the frame as it is, changed,
nothing, later, or a cut connection. The tests of one rewriting function per frame use
``TamperingProxy`` (conftest.py); the adversarial suite (adversarial/) injects one fault per link.

Each direction runs in its own thread, so a handler may sleep (a delayed frame stalls that
direction only, as a slow network would). An end of stream is passed on as a half-close, after
whatever incomplete frame was left.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.helpers import Frame

PROXY_TIMEOUT = 60.0
"""Seconds a socket may wait: a guard against a test that hangs, never an assertion."""
DIRECTIONS = ("c2s", "s2c")
"""Client to server, server to client."""
HEADER = 32


@dataclass(frozen=True)
class Seen:
    """A frame as its sender sent it (before any handler changed it)."""

    direction: str
    index: int
    """Its position among the frames of its direction on its link, from 0."""
    frame: Frame
    at: float
    """time.monotonic() when it was complete."""


class Link:
    """One relayed connection: what a handler may do to it, and what passed."""

    def __init__(self, number: int, client: socket.socket, server: socket.socket) -> None:
        self.number = number
        self.sinks = {"c2s": server, "s2c": client}
        host, port = server.getsockname()[:2]
        self.server_side = f"{host}:{port}"
        """The address the server sees this link come from (HOST:PORT in its log)."""
        self.seen: list[Seen] = []
        self.cut_at: float | None = None
        self.ended: dict[str, float] = {}
        """When each direction's sender ended its stream (monotonic time)."""
        self._lock = threading.Lock()
        self.done = threading.Event()
        """Set when both directions have ended."""

    def send(self, direction: str, data: bytes) -> None:
        """Forward ``data`` to the receiver of ``direction``; nothing once the link is cut."""
        with self._lock:
            if self.cut_at is None and data:
                self.sinks[direction].sendall(data)

    def cut(self) -> None:
        """End both directions now, in order (FIN to both ends): what the line carried so far is all
        either end gets. Whatever the ends send afterwards is read and thrown away."""
        with self._lock:
            if self.cut_at is None:
                self.cut_at = time.monotonic()
                for sink in self.sinks.values():
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_WR)

    def frames(self, direction: str) -> list[Frame]:
        """The frames the sender of ``direction`` sent, in order."""
        return [s.frame for s in self.seen if s.direction == direction]

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def _finish(self, direction: str) -> None:
        """The sender of ``direction`` ended its stream: pass the end on."""
        with self._lock:
            self.ended[direction] = time.monotonic()
            if self.cut_at is None:
                with contextlib.suppress(OSError):
                    self.sinks[direction].shutdown(socket.SHUT_WR)
            self._close_when_done()

    def _fail(self, direction: str) -> None:
        """Reading or writing failed (a reset): reset the receiver's side as well."""
        with self._lock:
            self.ended.setdefault(direction, time.monotonic())
            for sink in self.sinks.values() if self.cut_at is None else ():
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_RDWR)
            self._close_when_done()

    def _close_when_done(self) -> None:
        """Once neither direction reads any more, nothing uses the sockets: close them (a proxy may
        relay thousands of links)."""
        if len(self.ended) == 2:
            for sock in self.sinks.values():
                sock.close()
            self.done.set()


class Handler:
    """What a link does with each frame; this one forwards everything unchanged."""

    def frame(self, link: Link, seen: Seen) -> None:
        link.send(seen.direction, seen.frame.raw)

    def end(self, link: Link, direction: str, rest: bytes) -> None:
        """The sender of ``direction`` ended its stream after ``rest`` (an incomplete frame, or b"")."""
        link.send(direction, rest)


@dataclass
class FrameProxy:
    """Listens on 127.0.0.1 (port ``port``) and relays every connection to ``upstream_port``.

    ``handler_for(link)`` gives the handler of each new link (default: forward everything);
    ``source_host()``, when given, the loopback address each link comes from at the server (so that a
    server's log tells links apart by host, which its once-a-minute limit on repeated failures from
    one host would otherwise merge).
    """

    upstream_port: int
    handler_for: Callable[[Link], Handler] = field(default=lambda link: Handler())
    source_host: Callable[[], str] | None = None
    links: list[Link] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._start(self._accept)

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                source = None if self.source_host is None else (self.source_host(), 0)
                server = socket.create_connection(
                    ("127.0.0.1", self.upstream_port), timeout=PROXY_TIMEOUT, source_address=source
                )
            except OSError as exc:
                self.errors.append(exc)
                client.close()
                continue
            client.settimeout(PROXY_TIMEOUT)
            link = Link(len(self.links), client, server)
            handler = self.handler_for(link)
            self.links.append(link)
            self._start(self._relay, link, handler, "c2s", client)
            self._start(self._relay, link, handler, "s2c", server)

    def _relay(self, link: Link, handler: Handler, direction: str, source: socket.socket) -> None:
        buffer = bytearray()
        index = 0
        try:
            while data := source.recv(1 << 16):
                if link.cut_at is not None:
                    continue  # the line is dead: read and forget
                buffer += data
                while len(buffer) >= HEADER:
                    end = HEADER + int.from_bytes(buffer[8:12], "big")
                    if len(buffer) < end:
                        break
                    seen = Seen(direction, index, Frame(bytes(buffer[:end])), time.monotonic())
                    del buffer[:end]
                    index += 1
                    link._record(seen)
                    if link.cut_at is None:
                        handler.frame(link, seen)
            handler.end(link, direction, bytes(buffer))
            link._finish(direction)
        except OSError:
            link._fail(direction)

    def close(self) -> None:
        """Stop accepting, wait for the links to end (each within PROXY_TIMEOUT), close every socket."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (Linux)
        self._listener.close()
        for thread in self._threads:
            thread.join(PROXY_TIMEOUT)
        for link in self.links:
            for sock in link.sinks.values():
                sock.close()
