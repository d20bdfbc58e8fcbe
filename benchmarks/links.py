"""Point-to-point links over loopback: ISCL (blocking transport), plain TCP and Python `ssl` TLS 1.3.

Each server runs in its own spawned process (as it would on another machine), so sender and
receiver each have a core. A measured transfer ends when the receiver has taken the last byte:
ISCL's line disconnection answers only after every message was verified, and the TCP and TLS
receivers acknowledge an end-of-stream frame, so the three are timed alike.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from benchmarks.common import use_token_in_child
from benchmarks.tls import Credentials
from iscl_hsm.allocator import keep_bulk_buffers
from iscl_hsm.engine import Config
from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder
from iscl_hsm.transport.blocking import IsclSocket

READY = b"\x01"
WORKERS = 64
"""Connections a benchmark server serves at once (every section opens them one or a few at a time)."""
_LENGTH = struct.Struct("!Q")
_READ = 1 << 20


def serve_iscl(listeners: list[tuple[socket.socket, Config]], data_dir: str, label: str, pin: str,
               record_keys: str = "host") -> None:
    """Server process: one listener per configuration; accept links forever and read every message."""
    use_token_in_child(data_dir)
    keep_bulk_buffers()  # as `iscl` does
    holder = Pkcs11KeyHolder(label, pin, record_keys=record_keys)

    def read_all(config: Config) -> Callable[[socket.socket], None]:
        def serve_one(sock: socket.socket) -> None:
            link = IsclSocket.accept(sock, key_holder=holder, config=config)
            while link.recv() is not None:
                pass

        return serve_one

    serve_forever([(listener, read_all(config)) for listener, config in listeners])


def serve_forever(listeners: list[tuple[socket.socket, Callable[[socket.socket], None]]]) -> None:
    """Accept on every listener until killed; serve each connection on a pooled worker thread.

    A worker is reused once its connection ends, as a production server's would be, so no handshake
    figure includes starting a thread (0.1 to 0.4 ms here, which TLS and ISCL would both pay).
    """
    pool = ThreadPoolExecutor(max_workers=WORKERS)

    def accept_loop(listener: socket.socket, serve_one: Callable[[socket.socket], None]) -> None:
        while True:
            sock, _ = listener.accept()
            pool.submit(serve_one, sock)

    for listener, serve_one in listeners:
        threading.Thread(target=accept_loop, args=(listener, serve_one), daemon=True).start()
    threading.Event().wait()


def iscl_rate(link: IsclSocket, payload: bytes, seconds: float) -> float:
    """Bytes per second of secured messages (at least one) until the server has verified the last one."""
    sent = 0
    started = time.perf_counter()
    while not sent or time.perf_counter() - started < seconds:
        link.send(payload)
        sent += len(payload)
    link.close()  # returns once the server has answered the disconnection, after every message
    return sent / (time.perf_counter() - started)


def serve_framed(listener: socket.socket, credentials: Credentials | None) -> None:
    """Server process for plain TCP (``credentials`` None) or TLS 1.3, served as :func:`serve_forever` does.

    Per connection: (TLS handshake,) send READY, then read frames (8-byte length, data); a frame of
    length 0 is answered with READY.
    """
    keep_bulk_buffers()
    context = credentials.server_context() if credentials else None

    def serve_one(raw: socket.socket) -> None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock = context.wrap_socket(raw, server_side=True) if context else raw
            sock.sendall(READY)
            buffer = memoryview(bytearray(_READ))
            while (header := _read_exactly(sock, buffer, _LENGTH.size)) is not None:
                remaining = _LENGTH.unpack(header)[0]
                if not remaining:
                    sock.sendall(READY)
                while remaining:
                    got = sock.recv_into(buffer, min(remaining, _READ))
                    if not got:
                        return
                    remaining -= got
        except (OSError, ssl.SSLError):
            pass  # a client that went away: nothing to measure
        finally:
            raw.close()

    serve_forever([(listener, serve_one)])


def _read_exactly(sock: socket.socket, buffer: memoryview, count: int) -> bytes | None:
    got = 0
    while got < count:
        n = sock.recv_into(buffer[got:count])
        if not n:
            return None
        got += n
    return bytes(buffer[:count])


def framed_connect(port: int, context: ssl.SSLContext | None) -> socket.socket:
    """Connect (and run the TLS handshake); returns once the server said READY, so both ends are up."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname="localhost")
    if sock.recv(1) != READY:
        raise RuntimeError(f"the benchmark server on 127.0.0.1:{port} did not answer")
    return sock


def framed_rate(sock: socket.socket, payload: bytes, seconds: float) -> float:
    """Bytes per second of ``payload`` frames (at least one) until the server acknowledged the last."""
    frame = _LENGTH.pack(len(payload)) + payload
    sent = 0
    started = time.perf_counter()
    while not sent or time.perf_counter() - started < seconds:
        sock.sendall(frame)
        sent += len(payload)
    sock.sendall(_LENGTH.pack(0))
    if sock.recv(1) != READY:
        raise RuntimeError("the benchmark server closed before acknowledging")
    rate = sent / (time.perf_counter() - started)
    sock.close()
    return rate
