"""No fault of the peer leaves a link waiting for ever: each timeout, on both transports.

A real server link (SoftHSM2 keys, blocking IsclSocket or asyncio IsclStream on an accepted socket)
faces a client that runs the engine by hand and then falls silent at the point under test. Every
timeout but the one under test is the safety net, so the failure must come from that one.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from iscl_hsm.engine import Config, Connection, Profile, Role, State
from iscl_hsm.errors import ErrorCode, RemoteProtocolError
from iscl_hsm.keyholder.base import KeyHolder
from iscl_hsm.transport import aio
from iscl_hsm.transport.blocking import IsclSocket
from iscl_hsm.transport.common import Timeouts
from iscl_hsm.wire import MessageId
from tests.helpers import cfg, split_frames

from .conftest import Hospitals, Outcome, header, raw_client_handshake, raw_sealed_message

SAFETY_NET = 60.0
"""Seconds anything may take here: a guard against hangs, never an assertion."""
SHORT = 0.4
BIG = 8 << 20
"""A message larger than every socket buffer between the two ends, so a peer that reads nothing stalls it."""

WAITS: dict[str, tuple[str, str]] = {
    # the point: (the timeout that must fire, words of its message)
    "idle": ("idle", "the link was idle"),
    "message": ("message", "its next block or its MAC"),
    "answer": ("answer", "the answer to its message request"),
    "close": ("close", "its line disconnection request"),
    "stalled": ("message", "took none of our data"),
}

SYNC_SCRIPTS: dict[str, Callable[[IsclSocket], Any]] = {
    "idle": IsclSocket.recv,
    "message": IsclSocket.recv,
    "answer": lambda link: link.send(b"is anyone there?"),
    "close": IsclSocket.close,
    "stalled": lambda link: link.send(bytes(BIG)),
}


async def _async_script(point: str, stream: aio.IsclStream) -> Any:
    if point in ("idle", "message"):
        return await stream.recv()
    if point == "close":
        return await stream.close()
    return await stream.send(b"is anyone there?" if point == "answer" else bytes(BIG))


def serve(
    listener: socket.socket, transport: str, holder: KeyHolder, config: Config, timeouts: Timeouts, point: str
) -> tuple[threading.Thread, Outcome]:
    """Accept one link in a thread and run the server's side of ``point`` on it."""
    outcome = Outcome()

    def run() -> None:
        try:
            sock, _ = listener.accept()
            if transport == "blocking":
                with IsclSocket.accept(sock, key_holder=holder, config=config, timeouts=timeouts) as link:
                    outcome.value = SYNC_SCRIPTS[point](link)
            else:
                outcome.value = asyncio.run(_async_serve(sock, holder, config, timeouts, point))
        except BaseException as exc:  # noqa: BLE001 - examined by the test
            outcome.error = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


async def _async_serve(sock: socket.socket, holder: KeyHolder, config: Config, timeouts: Timeouts, point: str) -> Any:
    stream = await aio.handshake_on(sock, Role.SERVER, key_holder=holder, config=config, timeouts=timeouts)
    try:
        return await _async_script(point, stream)
    finally:
        await stream.abort()


def fall_silent(point: str, sock: socket.socket, conn: Any) -> None:
    """The client's part: go as far as ``point`` says, then send (and for "stalled" read) nothing more."""
    if point == "message":
        frames = split_frames(raw_sealed_message(sock, conn, b"m" * 1000))
        assert frames[-1].is_(MessageId.MAC_TRANSMISSION_NOTIF)
        sock.sendall(b"".join(f.raw for f in frames[:-1]))  # every block, but never the MAC
    elif point == "stalled":  # accept the server's message, then never read again
        while not (out := conn.data_to_send()):
            conn.receive_data(sock.recv(1 << 16))
        sock.sendall(out)


@pytest.mark.parametrize("point", list(WAITS))
@pytest.mark.parametrize("transport", ["blocking", "asyncio"])
def test_a_peer_that_falls_silent_fails_the_link_with_the_timeout_for_what_was_awaited(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], profile: Profile, transport: str, point: str
) -> None:
    which, words = WAITS[point]
    limits = {name: SAFETY_NET for name in ("handshake", "answer", "message", "close", "idle")}
    timeouts = Timeouts(**{**limits, which: SHORT})
    config = cfg(profile, max_message=2 * BIG)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(SAFETY_NET)
        thread, server = serve(listener, transport, holders(hospitals.a), config, timeouts, point)
        receive_buffer = 4096 if point == "stalled" else None
        sock, conn = raw_client_handshake(
            listener.getsockname()[1], holders(hospitals.b), config, receive_buffer=receive_buffer
        )
        with sock:
            fall_silent(point, sock, conn)
            thread.join(SAFETY_NET)
    assert not thread.is_alive(), "the server link never gave up"
    error = server.failed(RemoteProtocolError, ErrorCode.TIMED_OUT)
    assert words in str(error) and f"{SHORT:g} s" in str(error)
    assert f"--{which}-timeout" in str(error)


def test_a_request_made_while_the_link_idles_is_bounded_by_the_answer_timeout(
    hospitals: Hospitals, holders: Callable[..., KeyHolder]
) -> None:
    """asyncio: the pump's read began under the idle limit; the request must shorten it."""
    timeouts = Timeouts(answer=SHORT, idle=SAFETY_NET)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(SAFETY_NET)

        async def scenario() -> None:
            sock, _ = await asyncio.to_thread(listener.accept)
            stream = await aio.handshake_on(sock, Role.SERVER, key_holder=holders(hospitals.a), timeouts=timeouts)
            await asyncio.sleep(SHORT * 2)  # idle for longer than the answer timeout: no harm
            try:
                await stream.send(b"hello?")
            finally:
                await stream.abort()

        result: list[BaseException] = []
        thread = threading.Thread(target=lambda: _keep_error(result, lambda: asyncio.run(scenario())), daemon=True)
        thread.start()
        sock, _conn = raw_client_handshake(listener.getsockname()[1], holders(hospitals.b), Config())
        with sock:
            thread.join(SAFETY_NET)
    (error,) = result
    assert isinstance(error, RemoteProtocolError) and error.code is ErrorCode.TIMED_OUT
    assert "the answer to its message request" in str(error)


def _keep_error(errors: list[BaseException], work: Callable[[], object]) -> None:
    try:
        work()
    except BaseException as exc:  # noqa: BLE001 - examined by the test
        errors.append(exc)


def test_a_message_that_arrives_whole_is_not_cut_by_the_message_timeout(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], profile: Profile
) -> None:
    """The message timeout counts from the last bytes received, not from the start of the message."""
    timeouts = Timeouts(message=SHORT)
    config = cfg(profile, max_block=64)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(SAFETY_NET)
        thread, server = serve(listener, "blocking", holders(hospitals.a), config, timeouts, "message")
        sock, conn = raw_client_handshake(listener.getsockname()[1], holders(hospitals.b), config)
        with sock:
            frames = split_frames(raw_sealed_message(sock, conn, b"slow" * 64))
            for frame in frames:  # 17 frames, SHORT / 2 apart: longer in all than the timeout
                sock.sendall(frame.raw)
                threading.Event().wait(SHORT / 2)
            thread.join(SAFETY_NET)
    assert server.get() == b"slow" * 64


WATCHED = 0.3
"""The answer timeout of the link under test: the watchdog's deadline."""


def serve_then_send_garbage(listener: socket.socket, holder: KeyHolder, config: Any) -> threading.Thread:
    """A server that runs the engine by hand: the handshake, then it reads the client's message request
    and sends, instead of an answer, a header no ISCL end accepts (the client's engine fails on it)."""

    def run() -> None:
        sock, _ = listener.accept()
        with sock:
            conn = Connection(Role.SERVER, holder, config)
            conn.initiate()
            sock.sendall(conn.data_to_send())
            while conn.state is not State.READY:
                conn.receive_data(sock.recv(1 << 16))
                sock.sendall(conn.data_to_send())
            sock.recv(1 << 16)  # MESSAGE_TRANSMISSION_RQ
            sock.sendall(header(0x00CD0001, 0))
            while sock.recv(1 << 16):  # until the client hangs up
                pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_the_watchdog_firing_while_a_failed_engine_call_finishes_in_a_worker_thread(
    hospitals: Hospitals, holders: Callable[..., KeyHolder]
) -> None:
    """asyncio: the answer timeout runs out while an engine call that has already failed the engine is
    still in its worker thread (a V1.00 link whose key lives in the token makes every engine call
    there). The adversarial suite met this under load; it used to raise inside the watchdog's timer,
    which asyncio printed with a traceback. Expected: the link fails with the engine's one error and
    nothing escapes into asyncio's exception handler."""
    config = cfg(Profile.V100)  # key 1: hospital B's encryption key is not host-readable, used in the token
    escaped: list[dict[str, Any]] = []

    async def client(port: int) -> BaseException:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: escaped.append(context))
        stream = await aio.open_connection(
            "127.0.0.1",
            port,
            key_holder=holders(hospitals.b),
            config=config,
            timeouts=Timeouts(answer=WATCHED),
        )
        assert stream.connection.may_block  # every engine call of this link runs in a worker thread
        engine_receive = stream.connection.receive_data

        def receive_then_linger(data: bytes) -> Any:
            try:
                return engine_receive(data)  # fails the engine: 104, the garbage header
            finally:
                time.sleep(2 * WATCHED)  # the thread is slow to hand the failure back (a loaded machine)

        stream.connection.receive_data = receive_then_linger  # type: ignore[method-assign]
        try:
            with pytest.raises(RemoteProtocolError) as failure:
                await stream.send(b"is anyone there?")
            return failure.value
        finally:
            await stream.abort()

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)
        server = serve_then_send_garbage(listener, holders(hospitals.a), config)
        error = asyncio.run(client(listener.getsockname()[1]))
        server.join(30)
    assert escaped == [], [context.get("message") for context in escaped]
    assert isinstance(error, RemoteProtocolError) and error.code is ErrorCode.BAD_MESSAGE_ID, error
