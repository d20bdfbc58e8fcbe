"""The relay (iscl_hsm.transport.relay.Link) between a plain stream and an ISCL stream, on SoftHSM2 tokens.

Hospital A serves ISCL on loopback (the far end, driven by the test); hospital B's ISCL stream and one
end of a socket pair (the "application", also driven by the test) are joined by a Link. Each test runs
its own event loop with asyncio.run. Every test runs in both wire profiles: V1.00 carries one
transmission at a time on the link, hardened both directions at once, and the relay must not care.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from iscl_hsm.dicom.pdu import announces_data_set
from iscl_hsm.engine import Config, Profile
from iscl_hsm.errors import ErrorCode, RemoteProtocolError
from iscl_hsm.keyholder.base import KeyHolder
from iscl_hsm.transport import aio
from iscl_hsm.transport import relay as relay_module
from iscl_hsm.transport.relay import Address, Link, LinkRecord
from iscl_hsm.wire import MessageId
from tests.dimse import echo_request, store_request
from tests.helpers import Frame

from .conftest import Hospitals, TamperingProxy

TIMEOUT = 60.0
"""Seconds a whole test's event loop may run: a safety net against hangs, never an assertion."""

T = TypeVar("T")

Far = Callable[[aio.IsclStream], Awaitable[None]]
App = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


async def relay(
    far: Far, app: App, a: KeyHolder, b: KeyHolder, profile: Profile, *, far_config: Config | None = None,
    via: Callable[[int], int] = lambda port: port, coalesce: Callable[[bytes], bool] | None = None,
) -> Link:  # fmt: skip
    """Run ``far`` on A's side of an ISCL link, ``app`` on the plain side of a Link to B's side; the Link.

    Both ends speak ``profile``; ``far_config`` (of the same profile) replaces A's settings."""
    config = Config(profile=profile)
    far_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def serve(stream: aio.IsclStream) -> None:
        try:
            await far(stream)
            far_done.set_result(None)
        except BaseException as exc:  # noqa: BLE001 - raised in the test below
            far_done.set_exception(exc)

    server = await aio.start_server(serve, "127.0.0.1", 0, key_holder=a, config=far_config or config)
    async with server:
        stream = await aio.open_connection(
            "127.0.0.1", via(server.sockets[0].getsockname()[1]), key_holder=b, config=config
        )
        app_end, link_end = socket.socketpair()
        link = Link(
            LinkRecord(Address("app", 0), Address.of(stream.peer)), plain="the test application",
            iscl=str(Address.of(stream.peer)), chunk_size=1024 * 1024, coalesce=coalesce,
        )  # fmt: skip
        link.attach_plain(*await asyncio.open_connection(sock=link_end))
        link.attach_iscl(stream)
        app_reader, app_writer = await asyncio.open_connection(sock=app_end)
        await asyncio.gather(link.run(), app(app_reader, app_writer))
        app_writer.close()
        await far_done
    return link


def test_clean_end_carries_both_ways_and_disconnects_the_line(
    hospitals: Hospitals, holders: Any, profile: Profile
) -> None:
    received: list[bytes | None] = []

    async def far(stream: aio.IsclStream) -> None:
        await stream.send(b"reply")
        received.extend([await stream.recv(), await stream.recv()])

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readexactly(5) == b"reply"
        writer.write(b"hello")
        writer.write_eof()
        assert await reader.read() == b""  # the line disconnection half-closes the application's side

    link = run(relay(far, app, holders(hospitals.a), holders(hospitals.b), profile))
    assert received == [b"hello", None]
    assert link.error is None
    assert (link.record.plain_to_iscl, link.record.iscl_to_plain) == (5, 5)
    fields = link.record.fields(link.error)
    assert (fields["plain_to_iscl"], fields["iscl_to_plain"], fields["result"]) == (5, 5, "closed")
    assert "error" not in fields and "code" not in fields


def test_a_message_refused_as_too_long_is_split_to_the_peers_maximum(
    hospitals: Hospitals, holders: Any, profile: Profile
) -> None:
    data = os.urandom(5000)
    messages: list[bytes] = []

    async def far(stream: aio.IsclStream) -> None:
        while (message := await stream.recv()) is not None:
            messages.append(message)

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        writer.write_eof()
        assert await reader.read() == b""

    link = run(relay(far, app, holders(hospitals.a), holders(hospitals.b), profile,
                     far_config=Config(profile=profile, max_message=1000)))  # fmt: skip
    assert link.error is None
    assert b"".join(messages) == data
    assert max(len(m) for m in messages) == 1000  # nothing longer got through; the refused 5000 bytes came again
    assert link.record.plain_to_iscl == 5000


async def collect(stream: aio.IsclStream, messages: list[bytes]) -> None:
    """The far end: keep every message until the line is disconnected."""
    while (message := await stream.recv()) is not None:
        messages.append(message)


def test_a_command_and_the_data_set_it_announces_go_out_as_one_message(
    hospitals: Hospitals, holders: Any, monkeypatch: pytest.MonkeyPatch, profile: Profile
) -> None:
    """The application writes the data set only once the link has read the command and is waiting for more."""
    monkeypatch.setattr(relay_module, "COALESCE_WAIT", TIMEOUT)  # the wait's length is not what is tested
    command, *data_set = store_request()
    waiting = asyncio.Event()
    messages: list[bytes] = []

    def coalesce(data: bytes) -> bool:
        if announces := announces_data_set(data):
            waiting.set()
        return announces

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(command)
        await waiting.wait()
        writer.write(b"".join(data_set))
        writer.write_eof()
        assert await reader.read() == b""

    link = run(relay(lambda s: collect(s, messages), app, holders(hospitals.a), holders(hospitals.b), profile,
                     coalesce=coalesce))  # fmt: skip
    assert link.error is None
    assert messages == [command + b"".join(data_set)]


@pytest.mark.parametrize(
    ("first", "wait"),
    [(store_request()[0], 0.01), (echo_request(), 10 * TIMEOUT)],
    ids=["data-set-late", "nothing-announced"],
)
def test_a_read_goes_out_alone_when_nothing_more_comes_in_time_or_nothing_is_announced(
    hospitals: Hospitals, holders: Any, monkeypatch: pytest.MonkeyPatch, first: bytes, wait: float,
    profile: Profile,
) -> None:  # fmt: skip
    """The application sends more only after the far end has received its first read: that read went alone.

    With nothing announced the link must not wait at all: a wait longer than the test's timeout
    would fail it.
    """
    monkeypatch.setattr(relay_module, "COALESCE_WAIT", wait)
    later = os.urandom(100)
    messages: list[bytes] = []

    async def far(stream: aio.IsclStream) -> None:
        messages.append(await stream.recv() or b"")
        await stream.send(b"got it")
        await collect(stream, messages)

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(first)
        assert await reader.readexactly(6) == b"got it"
        writer.write(later)
        writer.write_eof()
        assert await reader.read() == b""

    link = run(relay(far, app, holders(hospitals.a), holders(hospitals.b), profile, coalesce=announces_data_set))
    assert link.error is None
    assert messages == [first, later]


def test_a_failure_resets_the_plain_side_and_forwards_nothing_after_it(
    hospitals: Hospitals, holders: Any, mitm: Callable[[int, Callable[[str, Frame], bytes]], TamperingProxy],
    profile: Profile,
) -> None:
    """The same in both profiles: the bit is flipped in the link's second message ("first" is the first,
    which V1.00's DES-CBC + DES-MAC could not protect: first_message_malleable)."""
    notifications: list[Frame] = []
    proxies: list[TamperingProxy] = []

    def tamper(direction: str, frame: Frame) -> bytes:
        if direction == "s2c" and frame.is_(MessageId.MESSAGE_TRANSMISSION_NOTIF):
            notifications.append(frame)
            if len(notifications) == 2:
                return frame.flip_bit(-1, 7)
        return frame.raw

    def via_proxy(port: int) -> int:
        proxies.append(mitm(port, tamper))
        return proxies[0].port

    far_error: list[BaseException] = []

    async def far(stream: aio.IsclStream) -> None:
        await stream.send(b"first")
        try:
            await stream.send(b"second")
            await stream.recv()
        except (RemoteProtocolError, OSError) as exc:
            far_error.append(exc)

    app_read: list[bytes] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1024):
                app_read.append(data)
        except ConnectionResetError:
            app_read.append(b"<reset>")

    link = run(relay(far, app, holders(hospitals.a), holders(hospitals.b), profile, via=via_proxy))
    assert len(notifications) == 2
    assert b"".join(app_read).removesuffix(b"<reset>") == b"first"  # not a byte of "second"
    assert link.error is not None and link.error.code is ErrorCode.BAD_MAC
    assert link.record.iscl_to_plain == 5
    assert far_error, "the far end should see the link aborted"
