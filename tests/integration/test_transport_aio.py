"""The asyncio transport (open_connection / start_server) end to end over loopback TCP and SoftHSM2.

Each test runs its own event loop with asyncio.run (pytest-asyncio is not used). Hospital A serves,
hospital B connects; both hold the same keys (see the ``hospitals`` fixture in conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import pytest

from iscl_hsm import wire
from iscl_hsm.engine import Config, Connection, Profile, State
from iscl_hsm.errors import ErrorCode, IsclError, KeyHolderError, LocalProtocolError, RemoteProtocolError
from iscl_hsm.keyholder.base import Buffer, KeyHolder, RecordKey
from iscl_hsm.transport import aio
from iscl_hsm.transport.aio import IsclStream, MessageRefusedError
from iscl_hsm.wire import Encryption, Mac, MessageId
from tests.helpers import Frame, cfg, split_frames

from .conftest import (
    MAC_SUITES,
    SUITES,
    Hospitals,
    Outcome,
    TamperingProxy,
    header,
    raw_client_handshake,
    raw_sealed_message,
)

TIMEOUT = 60.0
"""Seconds a whole test's event loop may run: a safety net against hangs, never an assertion."""

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


class Served:
    """A start_server handler that runs ``script(stream)`` per link and keeps each Outcome."""

    def __init__(self, script: Callable[[IsclStream], Awaitable[Any]]) -> None:
        self._script = script
        self.outcomes: list[Outcome] = []
        self.peers: list[Any] = []
        self._changed = asyncio.Event()

    async def __call__(self, stream: IsclStream) -> None:
        outcome = Outcome()
        self.peers.append(stream.peer)
        try:
            outcome.value = await self._script(stream)
        except BaseException as exc:  # noqa: BLE001 - examined by the test
            outcome.error = exc
        finally:
            await stream.abort()
            self.outcomes.append(outcome)
            self._changed.set()

    async def wait(self, count: int = 1) -> list[Outcome]:
        while len(self.outcomes) < count:
            self._changed.clear()
            await self._changed.wait()
        return self.outcomes


@contextlib.asynccontextmanager
async def serving(
    handler: Callable[[IsclStream], Awaitable[None]],
    holder: KeyHolder,
    config: Config | None = None,
    on_error: Callable[[Any, BaseException], None] | None = None,
) -> AsyncIterator[int]:
    """start_server on an ephemeral loopback port; yields the port."""
    server = await aio.start_server(
        handler, "127.0.0.1", 0, key_holder=holder, config=config, on_error=on_error
    )
    async with server:
        yield server.sockets[0].getsockname()[1]


async def connect(port: int, holder: KeyHolder, config: Config | None = None) -> IsclStream:
    return await aio.open_connection("127.0.0.1", port, key_holder=holder, config=config)


async def until_closed(stream: IsclStream) -> None:
    assert await stream.recv() is None, "expected the peer to disconnect the line"


async def one_message(stream: IsclStream) -> bytes | None:
    """A server script: the first message, once the peer has disconnected the line."""
    got = await stream.recv()
    await until_closed(stream)
    return got


# --- every suite, both ways ---------------------------------------------------------------------


@pytest.mark.parametrize("record_keys", ["host", "token"])
@pytest.mark.parametrize(("encryption", "mac", "enc_key_id"), SUITES)
def test_every_suite_carries_messages_both_ways(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], profile: Profile, record_keys: str,
    encryption: Encryption, mac: Mac, enc_key_id: int,
) -> None:  # fmt: skip
    config = cfg(profile, encryption=encryption, mac=mac, enc_key_id=enc_key_id)
    sizes = [0, 1, wire.MAX_BLOCK]
    to_server = [os.urandom(n) for n in sizes]
    to_client = [os.urandom(n) for n in sizes]

    async def server_script(stream: IsclStream) -> tuple[list[bytes | None], Any]:
        got = []
        for data in to_client:
            got.append(await stream.recv())
            await stream.send(data)
        await until_closed(stream)
        return got, stream.parameters

    async def main() -> tuple[list[bytes | None], Any, bytes | None, State, Outcome]:
        served = Served(server_script)
        async with serving(served, holders(hospitals.a, record_keys), config) as port:
            stream = await connect(port, holders(hospitals.b, record_keys), config)
            got = []
            for data in to_server:
                await stream.send(data)
                got.append(await stream.recv())
            await stream.close()
            after = await stream.recv()
            (server,) = await served.wait()
        return got, stream.parameters, after, stream.connection.state, server

    client_got, client_parameters, after_close, client_state, server = run(main())
    server_got, server_parameters = server.get()
    assert server_got == to_server and client_got == to_client
    assert after_close is None and client_state is State.CLOSED
    for parameters in (server_parameters, client_parameters):
        assert (parameters.encryption, parameters.mac, parameters.enc_key_id) == (encryption, mac, enc_key_id)
        assert parameters.block_length == wire.MAX_BLOCK and parameters.profile is profile


@pytest.mark.parametrize("record_keys", ["host", "token"])
def test_twenty_concurrent_links_through_one_server(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], record_keys: str
) -> None:
    links = 20

    async def echo(stream: IsclStream) -> int:
        count = 0
        while (data := await stream.recv()) is not None:
            await stream.send(data)
            count += 1
        return count

    async def client(port: int, holder: KeyHolder, number: int) -> list[bytes | None]:
        stream = await connect(port, holder)
        echoed = []
        for size in (1, 3000, 2 * wire.MAX_BLOCK + 7):
            message = (f"link {number:02} " * size).encode()[:size]
            await stream.send(message)
            echoed.append(await stream.recv())
            assert echoed[-1] == message
        await stream.close()
        return echoed

    async def main() -> tuple[list[Any], list[Outcome], list[Any]]:
        served = Served(echo)
        async with serving(served, holders(hospitals.a, record_keys)) as port:
            holder = holders(hospitals.b, record_keys)
            results = await asyncio.gather(
                *(client(port, holder, number) for number in range(links)), return_exceptions=True
            )
            outcomes = await served.wait(links)
        return results, outcomes, served.peers

    results, outcomes, peers = run(main())
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures
    assert all(len(echoed) == 3 for echoed in results)  # type: ignore[arg-type]
    assert [outcome.get() for outcome in outcomes] == [3] * links
    assert len(set(peers)) == links  # twenty distinct connections, all served at once


# --- handshake failures reach on_error ----------------------------------------------------------


@pytest.mark.parametrize("case", ["wrong-auth-key", "auth-key-missing-on-server", "key-id-not-allowed"])
def test_a_failed_handshake_reaches_on_error(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], case: str
) -> None:
    server_token, server_config, client_config, server_kind, server_code, client_code = {
        "wrong-auth-key": (
            hospitals.stranger, None, None,
            RemoteProtocolError, ErrorCode.AUTHENTICATION_FAILED, ErrorCode.AUTHENTICATION_FAILED,
        ),
        "auth-key-missing-on-server": (
            hospitals.stranger, None, Config(auth_key_id=3),
            KeyHolderError, ErrorCode.KEY_NOT_FOUND, ErrorCode.REMOTE_KEY_HOLDER,
        ),
        "key-id-not-allowed": (
            hospitals.a, Config(allowed_auth_key_ids=frozenset({1})), Config(auth_key_id=4),
            RemoteProtocolError, ErrorCode.BAD_OPTION, ErrorCode.BAD_OPTION,
        ),
    }[case]  # fmt: skip

    async def main() -> tuple[list[tuple[Any, BaseException]], Outcome, Served]:
        errors: list[tuple[Any, BaseException]] = []
        reported = asyncio.Event()

        def on_error(peer: Any, exc: BaseException) -> None:
            errors.append((peer, exc))
            reported.set()

        served = Served(until_closed)
        client = Outcome()
        async with serving(served, holders(server_token), server_config, on_error) as port:
            try:
                client.value = await connect(port, holders(hospitals.b), client_config)
            except BaseException as exc:  # noqa: BLE001 - examined below
                client.error = exc
            await reported.wait()
        return errors, client, served

    errors, client, served = run(main())
    client.failed(RemoteProtocolError, client_code)
    ((peer, error),) = errors
    assert peer[0] == "127.0.0.1"
    Outcome(error=error).failed(server_kind, server_code)
    if case == "auth-key-missing-on-server":
        assert "'iscl-auth-3'" in str(error) and hospitals.stranger.label in str(error)
    assert served.outcomes == []  # the handler never saw the failed link


def test_a_plain_http_client_reaches_on_error(
    hospitals: Hospitals, holders: Callable[..., KeyHolder]
) -> None:
    async def main() -> list[tuple[Any, BaseException]]:
        errors: list[tuple[Any, BaseException]] = []
        reported = asyncio.Event()

        def on_error(peer: Any, exc: BaseException) -> None:
            errors.append((peer, exc))
            reported.set()

        async with serving(Served(until_closed), holders(hospitals.a), on_error=on_error) as port:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await reported.wait()
            writer.close()
        return errors

    ((_, error),) = run(main())
    Outcome(error=error).failed(RemoteProtocolError, ErrorCode.BAD_MESSAGE_ID)


# --- clean close and failures as recv() reports them ----------------------------------------------


@pytest.mark.parametrize("closer", ["client", "server"])
def test_recv_after_the_peers_clean_close_returns_none(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], closer: str
) -> None:
    async def closing(stream: IsclStream) -> State:
        await stream.send(b"that is all")
        await stream.close()
        return stream.connection.state

    async def listening(stream: IsclStream) -> tuple[bytes | None, ...]:
        return await stream.recv(), await stream.recv(), await stream.recv()

    async def main() -> tuple[Any, Any]:
        served = Served(closing if closer == "server" else listening)
        async with serving(served, holders(hospitals.a)) as port:
            stream = await connect(port, holders(hospitals.b))
            client = await (listening(stream) if closer == "server" else closing(stream))
            (server,) = await served.wait()
        return server.get(), client

    server, client = run(main())
    closed, listened = (server, client) if closer == "server" else (client, server)
    assert closed is State.CLOSED
    assert listened == (b"that is all", None, None)


def test_a_recv_waiting_while_this_end_closes_returns_none(
    hospitals: Hospitals, holders: Callable[..., KeyHolder]
) -> None:
    """The usual reader task: it must end when this end disconnects, not wait forever."""

    async def main() -> tuple[bytes | None, bytes | None, Outcome]:
        served = Served(until_closed)
        async with serving(served, holders(hospitals.a)) as port:
            stream = await connect(port, holders(hospitals.b))
            reader = asyncio.create_task(stream.recv())
            await stream.close()
            waiting = await reader
            later = await stream.recv()
            (server,) = await served.wait()
        return waiting, later, server

    waiting, later, server = run(main())
    assert (waiting, later) == (None, None)
    assert server.get() is None


def test_close_after_the_peer_disconnected_is_quiet(
    hospitals: Hospitals, holders: Callable[..., KeyHolder]
) -> None:
    """Both ends may want to close; the one whose request came second just closes its socket."""

    async def server_script(stream: IsclStream) -> State:
        await stream.close()
        return stream.connection.state

    async def main() -> tuple[Outcome, bytes | None, State]:
        served = Served(server_script)
        async with serving(served, holders(hospitals.a)) as port:
            stream = await connect(port, holders(hospitals.b))
            got = await stream.recv()
            await stream.close()
            (server,) = await served.wait()
        return server, got, stream.connection.state

    server, got, state = run(main())
    assert server.get() is State.CLOSED
    assert (got, state) == (None, State.CLOSED)


def test_recv_after_a_dropped_line_raises_the_error(
    hospitals: Hospitals, holders: Callable[..., KeyHolder]
) -> None:
    async def receiver(stream: IsclStream) -> tuple[bytes | None, BaseException, BaseException]:
        first = await stream.recv()
        errors = []
        for _ in range(2):
            with pytest.raises(RemoteProtocolError) as caught:
                await stream.recv()
            errors.append(caught.value)
        return first, errors[0], errors[1]

    async def main() -> Outcome:
        served = Served(receiver)
        async with serving(served, holders(hospitals.a)) as port:
            stream = await connect(port, holders(hospitals.b))
            await stream.send(b"then the line drops")
            await stream.abort()
            (server,) = await served.wait()
        return server

    first, error, again = run(main()).get()
    assert first == b"then the line drops"
    Outcome(error=error).failed(RemoteProtocolError, ErrorCode.CONNECTION_LOST)
    assert again is error  # the same failure, every time


@pytest.mark.parametrize(("encryption", "mac", "enc_key_id"), MAC_SUITES)
def test_a_bit_flipped_in_transit_fails_recv_at_both_ends(
    hospitals: Hospitals, holders: Callable[..., KeyHolder],
    mitm: Callable[[int, Callable[[str, Frame], bytes]], TamperingProxy],
    profile: Profile, encryption: Encryption, mac: Mac, enc_key_id: int,
) -> None:  # fmt: skip
    """The last bit of the first data block of the link's second message (the first message of a V1.00
    DES-CBC + DES-MAC link is malleable, tests/integration/test_transport_blocking.py)."""
    config = cfg(profile, encryption=encryption, mac=mac, enc_key_id=enc_key_id)
    flipped: list[Frame] = []

    macs: list[Frame] = []

    def tamper(direction: str, frame: Frame) -> bytes:
        if direction == "c2s" and frame.is_(MessageId.MAC_TRANSMISSION_NOTIF):
            macs.append(frame)
        elif direction == "c2s" and frame.is_(MessageId.MESSAGE_TRANSMISSION_NOTIF) and macs and not flipped:
            flipped.append(frame)
            return frame.flip_bit(-1, 7)
        return frame.raw

    async def receiver(stream: IsclStream) -> bytes | None:
        assert await stream.recv() == b"first"
        return await stream.recv()

    async def main() -> tuple[Outcome, Outcome]:
        served = Served(receiver)
        client = Outcome()
        async with serving(served, holders(hospitals.a), config) as port:
            proxy = mitm(port, tamper)
            stream = await connect(proxy.port, holders(hospitals.b), config)
            await stream.send(b"first")
            await stream.send(os.urandom(2 * wire.MAX_BLOCK + 1))
            try:
                client.value = await stream.recv()
            except BaseException as exc:  # noqa: BLE001 - examined below
                client.error = exc
            (server,) = await served.wait()
        return server, client

    server, client = run(main())
    assert len(flipped) == 1
    server.failed(RemoteProtocolError, ErrorCode.BAD_MAC)
    client.failed(RemoteProtocolError, ErrorCode.CONNECTION_LOST)


def test_messages_verified_before_a_failure_are_still_delivered(
    hospitals: Hospitals, holders: Callable[..., KeyHolder]
) -> None:
    """A whole message and then garbage in one write: recv() returns the message, then raises."""
    config = Config()
    message = os.urandom(5000)

    def misbehaving_client(port: int, holder: KeyHolder) -> None:
        sock, conn = raw_client_handshake(port, holder, config, TIMEOUT)
        with sock:
            stream = raw_sealed_message(sock, conn, message)
            sock.sendall(stream + header(0x0BADBAD0, 0))
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(1 << 16):
                    pass

    received: list[bytes | None] = []

    async def receiver(stream: IsclStream) -> None:
        while True:
            received.append(await stream.recv())

    async def main() -> Outcome:
        served = Served(receiver)
        async with serving(served, holders(hospitals.a), config) as port:
            await asyncio.to_thread(misbehaving_client, port, holders(hospitals.b))
            (server,) = await served.wait()
        return server

    server = run(main())
    server.failed(RemoteProtocolError, ErrorCode.BAD_MESSAGE_ID)
    assert received == [message]


# --- refusals that leave the link up ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "server_max"),
    [(1001, 1000), (3 << 20, 1 << 20)],  # the second is sealed ahead in steps while the refusal is on its way
    ids=["short", "long"],
)
def test_a_message_longer_than_the_peer_accepts_is_refused_and_the_link_survives(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], length: int, server_max: int
) -> None:
    async def server_script(stream: IsclStream) -> tuple[bytes | None, Any]:
        got = await stream.recv()
        await until_closed(stream)
        return got, stream.connection.peer_request

    async def main() -> tuple[Outcome, MessageRefusedError]:
        served = Served(server_script)
        async with serving(served, holders(hospitals.a), Config(max_message=server_max)) as port:
            stream = await connect(port, holders(hospitals.b), Config(max_message=4 << 20))
            with pytest.raises(MessageRefusedError) as caught:
                await stream.send(bytes(length))
            await stream.send(b"x" * server_max)  # the chain is where it was before the refused message
            await stream.close()
            (server,) = await served.wait()
        return server, caught.value

    server, refused = run(main())
    got, peer_request = server.get()
    assert got == b"x" * server_max and peer_request.length == length
    assert refused.code is ErrorCode.PEER_LENGTH_TOO_SMALL
    assert (refused.length, refused.peer_max_length) == (length, server_max)


def test_the_sender_keeps_sealing_while_the_acceptance_is_on_its_way(
    hospitals: Hospitals, holders: Callable[..., KeyHolder],
    mitm: Callable[[int, Callable[[str, Frame], bytes]], TamperingProxy],
) -> None:  # fmt: skip
    """The acceptance is held up in transit: send() seals more of the message in steps meanwhile
    (not just the start that prepare() seals), and the message still arrives whole."""
    message = os.urandom(1 << 20)

    def slow_acceptance(direction: str, frame: Frame) -> bytes:
        if direction == "s2c" and frame.is_(MessageId.MESSAGE_TRANSMISSION_RP):
            threading.Event().wait(0.3)
        return frame.raw

    async def main() -> tuple[Outcome, int]:
        served = Served(one_message)
        async with serving(served, holders(hospitals.a)) as port:
            proxy = mitm(port, slow_acceptance)
            stream = await connect(proxy.port, holders(hospitals.b))
            conn, sealed = stream.connection, 0
            seal_ahead = conn.seal_ahead

            def counting() -> bool:
                nonlocal sealed
                step = seal_ahead()
                sealed += step
                return step

            conn.seal_ahead = counting  # type: ignore[method-assign]
            await stream.send(message)
            await stream.close()
            (server,) = await served.wait()
        return server, sealed

    server, sealed_steps = run(main())
    assert server.get() == message
    assert sealed_steps > 1  # prepare() seals one step; the rest came while the acceptance was held up


@pytest.mark.parametrize(
    ("messages", "limit"),
    [([b"first", bytes(1001), b"third"], 1000), ([os.urandom(300_000), bytes(1 << 21), os.urandom(300_000)], 1 << 20)],
    ids=["short", "long"],
)
def test_concurrent_senders_each_get_the_answer_to_their_own_message(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], messages: list[bytes], limit: int
) -> None:
    """The peer answers requests in order; three tasks sending at once each get their own answer,
    the refusal included, also while the first still seals its message ahead of the answer."""

    async def server_script(stream: IsclStream) -> list[bytes | None]:
        got = [await stream.recv(), await stream.recv()]
        await until_closed(stream)
        return got

    async def main() -> tuple[Outcome, list[BaseException | None]]:
        served = Served(server_script)
        async with serving(served, holders(hospitals.a), Config(max_message=limit)) as port:
            stream = await connect(port, holders(hospitals.b), Config(max_message=2 * limit))
            results = await asyncio.gather(*(stream.send(m) for m in messages), return_exceptions=True)
            await stream.close()
            (server,) = await served.wait()
        return server, results

    server, results = run(main())
    first, refused, third = results
    assert first is None and third is None
    assert isinstance(refused, MessageRefusedError) and refused.length == len(messages[1])
    assert server.get() == [messages[0], messages[2]]


def test_a_sender_waiting_for_the_answer_learns_that_the_line_dropped(
    hospitals: Hospitals, holders: Callable[..., KeyHolder],
    mitm: Callable[[int, Callable[[str, Frame], bytes]], TamperingProxy],
) -> None:  # fmt: skip
    """The server's acceptance never arrives (dropped in transit), then the server goes away: the
    send() that waits for the acceptance fails with CONNECTION_LOST instead of waiting forever."""

    def drop_acceptance(direction: str, frame: Frame) -> bytes:
        return b"" if direction == "s2c" and frame.is_(MessageId.MESSAGE_TRANSMISSION_RP) else frame.raw

    async def server_script(stream: IsclStream) -> None:
        await asyncio.sleep(0.3)  # the client is waiting for the acceptance by now; then this end aborts

    async def main() -> BaseException:
        served = Served(server_script)
        async with serving(served, holders(hospitals.a)) as port:
            proxy = mitm(port, drop_acceptance)
            stream = await connect(proxy.port, holders(hospitals.b))
            with pytest.raises(RemoteProtocolError) as caught:
                await stream.send(b"never accepted")
            await served.wait()
        return caught.value

    Outcome(error=run(main())).failed(RemoteProtocolError, ErrorCode.CONNECTION_LOST)


def test_a_send_caught_by_a_reset_leaves_no_unretrieved_error_behind(
    hospitals: Hospitals, holders: Callable[..., KeyHolder]
) -> None:
    """The peer resets the connection and send() starts before the pump has noticed: send() fails
    at its first write, and the request's answer, which nobody will await, must not end up holding
    the link's error for asyncio to print as "Future exception was never retrieved" (a traceback in
    a gateway's log for an expected failure)."""

    async def resetting(stream: IsclStream) -> None:
        sock = stream._writer.get_extra_info("socket")  # (to make the close below a TCP reset)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    async def main() -> tuple[str, list[dict[str, Any]]]:
        reported: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        served = Served(resetting)
        async with serving(served, holders(hospitals.a)) as port:
            stream = await connect(port, holders(hospitals.b))
            await served.wait()
            while not stream._writer.transport.is_closing():  # the reset has arrived, the pump not run
                await asyncio.sleep(0)
            try:
                await stream.send(b"A-ASSOCIATE-RQ")
            except OSError as exc:
                error = repr(exc)  # (not the exception: its frames would keep the request's answer alive)
            else:
                error = "no error"
            await asyncio.sleep(0.1)  # the pump finishes
            del stream
            gc.collect()  # an unretrieved error is reported when its future is freed
        return error, reported

    error, reported = run(main())
    assert error.startswith("ConnectionResetError("), error
    assert [context.get("message") for context in reported] == []


def test_a_link_still_open_when_the_event_loop_ends_is_aborted_without_a_traceback(
    hospitals: Hospitals, holders: Callable[..., KeyHolder]
) -> None:
    """asyncio.run cancels the server's handler task; Python 3.11's start_server would report that
    as an error with a traceback (as `iscl demo` once printed) unless the handler ends quietly."""
    reported: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        started = asyncio.Event()

        async def waiting(stream: IsclStream) -> None:
            started.set()
            await stream.recv()  # a message that never comes

        async with serving(waiting, holders(hospitals.a)) as port:
            await connect(port, holders(hospitals.b))
            await started.wait()
        # returning now leaves the handler running: asyncio.run cancels it

    run(main())
    assert [context.get("message") for context in reported] == []


def test_an_algorithm_mismatch_is_refused_and_the_link_survives(
    hospitals: Hospitals, holders: Callable[..., KeyHolder]
) -> None:
    async def server_script(stream: IsclStream) -> Any:
        await until_closed(stream)
        return stream.connection.peer_request

    async def main() -> tuple[Outcome, MessageRefusedError, State]:
        served = Served(server_script)
        async with serving(served, holders(hospitals.a), Config(encryption=Encryption.NONE)) as port:
            stream = await connect(port, holders(hospitals.b), Config(enc_key_id=wire.SESSION_KEYS))
            with pytest.raises(MessageRefusedError) as caught:
                await stream.send(b"under session keys")
            state = stream.connection.state
            await stream.close()
            (server,) = await served.wait()
        return server, caught.value, state

    server, refused, state = run(main())
    assert refused.code is ErrorCode.TRANSMISSION_MISMATCH and state is State.READY
    peer_request = server.get()
    assert (peer_request.encryption, peer_request.key_id) == (Encryption.DES_CBC, wire.SESSION_KEYS)


def test_a_refused_close_leaves_the_link_up(hospitals: Hospitals, holders: Callable[..., KeyHolder]) -> None:
    async def server_script(stream: IsclStream) -> bytes | None:
        got = await stream.recv()
        await stream.close()  # our own close is accepted: accept_close governs the peer's requests
        return got

    async def main() -> tuple[Outcome, BaseException, bytes | None]:
        served = Served(server_script)
        async with serving(served, holders(hospitals.a), Config(accept_close=False)) as port:
            stream = await connect(port, holders(hospitals.b))
            with pytest.raises(RemoteProtocolError) as caught:
                await stream.close()
            await stream.send(b"still here")
            after = await stream.recv()
            (server,) = await served.wait()
        return server, caught.value, after

    server, refused, after = run(main())
    Outcome(error=refused).failed(RemoteProtocolError, ErrorCode.PEER_REFUSED_CLOSE)
    assert server.get() == b"still here" and after is None


def test_a_message_longer_than_this_end_allows_is_refused_locally(
    hospitals: Hospitals, holders: Callable[..., KeyHolder]
) -> None:
    async def main() -> tuple[Outcome, LocalProtocolError]:
        served = Served(one_message)
        async with serving(served, holders(hospitals.a)) as port:
            stream = await connect(port, holders(hospitals.b), Config(max_message=100))
            with pytest.raises(LocalProtocolError) as caught:
                await stream.send(bytes(101))
            await stream.send(bytes(100))
            await stream.close()
            (server,) = await served.wait()
        return server, caught.value

    server, error = run(main())
    assert error.code is ErrorCode.LOCAL_LENGTH_TOO_SMALL
    assert server.get() == bytes(100)


def test_a_server_that_is_not_iscl(hospitals: Hospitals, holders: Callable[..., KeyHolder]) -> None:
    async def main() -> BaseException:
        async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            with contextlib.suppress(ConnectionError):
                await reader.read()
            writer.close()

        server = await asyncio.start_server(garbage, "127.0.0.1", 0)
        async with server:
            with pytest.raises(RemoteProtocolError) as caught:
                await connect(server.sockets[0].getsockname()[1], holders(hospitals.b))
        return caught.value

    Outcome(error=run(main())).failed(RemoteProtocolError, ErrorCode.BAD_MESSAGE_ID)


def test_nothing_listening_is_an_os_error(holders: Callable[..., KeyHolder], hospitals: Hospitals) -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        run(connect(port, holders(hospitals.b)))


def test_a_cancelled_handshake_leaves_no_unretrieved_failure(
    hospitals: Hospitals, holders: Callable[..., KeyHolder]
) -> None:
    """Cancelling open_connection while the peer is silent: the link's later failure is not orphaned."""
    import gc

    async def scenario() -> list[dict[str, Any]]:
        reported: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog), never answers
            port = silent.getsockname()[1]
            attempt = asyncio.create_task(
                aio.open_connection("127.0.0.1", port, key_holder=holders(hospitals.b), config=Config())
            )
            await asyncio.sleep(0.2)
            attempt.cancel()
            with pytest.raises(asyncio.CancelledError):
                await attempt
        for _ in range(20):  # let the pump see the end of the stream and fail the handshake
            await asyncio.sleep(0.01)
        gc.collect()
        await asyncio.sleep(0)
        return reported

    assert run(scenario()) == []


def test_a_silent_client_is_dropped_after_the_handshake_timeout(
    hospitals: Hospitals, holders: Callable[..., KeyHolder]
) -> None:
    errors: list[tuple[Any, BaseException]] = []

    async def scenario() -> bytes:
        server = await aio.start_server(
            lambda stream: asyncio.sleep(0), "127.0.0.1", 0, key_holder=holders(hospitals.a), config=Config(),
            on_error=lambda peer, exc: errors.append((peer, exc)), timeouts=aio.Timeouts(handshake=0.3),
        )  # fmt: skip
        async with server:
            reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
            received = await reader.read()  # the server's LINE_CONNECTION_CHECK_RQ, then its end of stream
            writer.close()
            return received

    received = run(scenario())
    assert split_frames(received)[0].is_(MessageId.LINE_CONNECTION_CHECK_RQ)
    ((peer, error),) = errors
    assert isinstance(error, RemoteProtocolError) and error.code is ErrorCode.TIMED_OUT
    assert f"no ISCL handshake with 127.0.0.1:{peer[1]} within 0.3 s" in str(error)


def test_a_silent_server_fails_open_connection_after_the_handshake_timeout(
    hospitals: Hospitals, holders: Callable[..., KeyHolder]
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        with pytest.raises(RemoteProtocolError) as info:
            run(aio.open_connection("127.0.0.1", port, key_holder=holders(hospitals.b), timeouts=aio.Timeouts(handshake=0.3)))
    assert info.value.code is ErrorCode.TIMED_OUT
    assert f"no ISCL handshake with 127.0.0.1:{port} within 0.3 s" in str(info.value)


# --- the event loop is never held by the key holder ---------------------------------------------


class _CallThreads(KeyHolder):
    """Passes every call on to a real key holder and notes the thread that made it, and the thread of
    every record operation made with a key that lives in the token."""

    def __init__(self, inner: KeyHolder) -> None:
        self._inner = inner
        self.host_record_keys = inner.host_record_keys
        self.gives_encryption_keys = inner.gives_encryption_keys
        self.threads: set[int] = set()

    def _noted(self, key: RecordKey) -> RecordKey:
        return key if key.in_process else _NotedKey(key, self.threads)

    def get_challenge(self, key_id: int) -> bytes:
        self.threads.add(threading.get_ident())
        return self._inner.get_challenge(key_id)

    def internal_authenticate(self, key_id: int, block: bytes) -> bytes:
        self.threads.add(threading.get_ident())
        return self._inner.internal_authenticate(key_id, block)

    def external_authenticate(self, key_id: int, challenge: bytes, cryptogram: bytes) -> bool:
        self.threads.add(threading.get_ident())
        return self._inner.external_authenticate(key_id, challenge, cryptogram)

    def derive_key(self, enc_key_id: int, block: bytes) -> RecordKey:
        self.threads.add(threading.get_ident())
        return self._noted(self._inner.derive_key(enc_key_id, block))

    def derive_keys(self, enc_key_id: int, blocks: Sequence[bytes]) -> list[RecordKey]:
        self.threads.add(threading.get_ident())
        return [self._noted(key) for key in self._inner.derive_keys(enc_key_id, blocks)]

    def encryption_key(self, enc_key_id: int) -> RecordKey:
        self.threads.add(threading.get_ident())
        return self._noted(self._inner.encryption_key(enc_key_id))


class _NotedKey:
    """A record key in the token whose every use notes its thread."""

    in_process = False

    def __init__(self, inner: RecordKey, threads: set[int]) -> None:
        self._inner, self._threads = inner, threads

    def encrypt_cbc(self, iv: bytes, data: Buffer) -> bytes:
        self._threads.add(threading.get_ident())
        return self._inner.encrypt_cbc(iv, data)

    def decrypt_cbc(self, iv: bytes, data: Buffer) -> bytes:
        self._threads.add(threading.get_ident())
        return self._inner.decrypt_cbc(iv, data)


@pytest.mark.parametrize("enc_key_id", [1, wire.SESSION_KEYS], ids=["key1", "session"])
def test_no_key_holder_call_runs_on_the_event_loop(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], profile: Profile, enc_key_id: int
) -> None:
    """A card takes 30-300 ms per command: one made on the loop would stall every other link. The
    peer sends handshake messages in pairs (LINE_RP with AUTH_RQ, AUTH_RP with PASS1), and one read
    returns both. Hospital B's encryption keys stay in its token, so under V1.00 with key 1 every
    record it protects is a token call too."""
    config = cfg(profile, enc_key_id=enc_key_id)
    server_holder, client_holder = _CallThreads(holders(hospitals.a)), _CallThreads(holders(hospitals.b))

    async def echo(stream: IsclStream) -> None:
        data = await stream.recv()
        assert data is not None
        await stream.send(data)
        await until_closed(stream)

    async def scenario() -> int:
        async with serving(echo, server_holder, config) as port:
            stream = await connect(port, client_holder, config)
            await stream.send(b"ping")
            assert await stream.recv() == b"ping"
            await stream.close()
        return threading.get_ident()

    loop_thread = run(scenario())
    assert server_holder.threads and client_holder.threads
    assert loop_thread not in server_holder.threads
    assert loop_thread not in client_holder.threads


def test_a_send_waiting_for_the_link_gets_the_failure_that_ended_it(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], profile: Profile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peer hangs up while the pump is in a slow engine call (a token call in a worker thread):
    a send() that waited for the link meanwhile reports the lost connection, not a link "in error"."""
    real = Connection.receive_data

    def slow_at_end_of_stream(self: Connection, data: bytes) -> list[Any]:
        if not data:
            time.sleep(0.2)
        return real(self, data)

    monkeypatch.setattr(Connection, "receive_data", slow_at_end_of_stream)
    config = cfg(profile)

    async def hang_up(stream: IsclStream) -> None:
        await stream.abort()

    async def main() -> IsclError:
        async with serving(hang_up, holders(hospitals.a), config) as port:
            stream = await connect(port, holders(hospitals.b), config)
            await asyncio.sleep(0.1)  # the pump has read the end of stream and is in receive_data
            with pytest.raises(IsclError) as caught:
                await stream.send(b"x")
            return caught.value

    error = run(main())
    assert error.code is ErrorCode.CONNECTION_LOST, error


def test_an_engine_call_in_a_worker_thread_keeps_the_lock_until_it_ends_even_when_cancelled() -> None:
    """Aborting a link cancels the coroutine that waits for an engine call running in a worker thread;
    the next engine call must still wait for that thread, or two run at once on one engine."""
    from iscl_hsm.engine import Role
    from iscl_hsm.keyholder.memory import MemoryKeyHolder

    class ThreadedConnection(Connection):
        @property
        def may_block(self) -> bool:
            return True  # every call goes to a worker thread, as a key holder's do

    release, order = threading.Event(), []

    def slow() -> None:
        release.wait(10)
        order.append("slow done")

    def next_call() -> None:
        order.append("next call")

    async def scenario() -> None:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            left = socket.create_connection(listener.getsockname())
            right, _ = listener.accept()
        with left, right:
            reader, writer = await asyncio.open_connection(sock=left)
            stream = IsclStream(reader, writer, ThreadedConnection(Role.CLIENT, MemoryKeyHolder({}, {}), Config()))
            first = asyncio.create_task(stream._locked_step(slow))
            await asyncio.sleep(0.05)
            first.cancel()
            second = asyncio.create_task(stream._locked_step(next_call))
            await asyncio.sleep(0.05)
            assert order == [] and not first.done()  # the cancelled call still holds the lock
            release.set()
            await asyncio.gather(first, return_exceptions=True)
            await second
            writer.close()

    run(scenario())
    assert order == ["slow done", "next call"]


def test_the_inbox_hands_messages_in_order_to_one_reader_at_a_time() -> None:
    from iscl_hsm.transport.aio import _Inbox

    async def scenario() -> None:
        inbox = _Inbox()
        reader = asyncio.create_task(inbox.get())
        await asyncio.sleep(0)
        with pytest.raises(LocalProtocolError, match="already waiting") as refused:
            await inbox.get()  # a second reader while the first waits
        assert refused.value.code is ErrorCode.BAD_STATE
        inbox.put(b"one")
        inbox.put(None)
        assert await reader == b"one"
        assert await inbox.get() is None
        cancelled = asyncio.create_task(inbox.get())
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        inbox.put(b"two")
        assert await inbox.get() == b"two"  # a cancelled reader leaves no waiter behind

    run(scenario())
