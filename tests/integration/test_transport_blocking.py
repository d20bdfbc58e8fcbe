"""The blocking transport (IsclSocket) end to end: real TCP on loopback, keys in real SoftHSM2 tokens.

Hospital A (the server, in a thread) and hospital B (the client, in the test's thread) hold the same
keys in two tokens (see the ``hospitals`` fixture in conftest.py). Every unhappy path checks the
exact ErrorCode at each end that notices it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from iscl_hsm import wire
from iscl_hsm.engine import Config, Profile, State
from iscl_hsm.engine.config import DEFAULT_AUTH_DATA
from iscl_hsm.errors import ErrorCode, IsclError, KeyHolderError, LocalProtocolError, RemoteProtocolError
from iscl_hsm.keyholder.base import KeyHolder
from iscl_hsm.transport.blocking import IsclSocket, MessageRefusedError
from iscl_hsm.transport.common import Timeouts
from iscl_hsm.wire import Encryption, Mac, MessageId
from tests.helpers import Frame, cfg, first_message_malleable, split_frames

from .conftest import (
    MAC_SUITES,
    SUITES,
    Hospitals,
    Outcome,
    SoftHsm,
    TamperingProxy,
    header,
    raw_client_handshake,
    raw_sealed_message,
)

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0
"""Seconds any socket operation may block: a safety net against hangs, never an assertion."""
SAFETY_NET = Timeouts(handshake=TIMEOUT, answer=TIMEOUT, message=TIMEOUT, close=TIMEOUT, idle=TIMEOUT)


# --- running a link ---------------------------------------------------------------------------------


Script = Callable[[IsclSocket], Any]


def serve_once(
    listener: socket.socket, holder: KeyHolder, config: Config | None, script: Script
) -> tuple[threading.Thread, Outcome]:
    """Accept one connection in a thread, run the server handshake and then ``script`` on it."""
    outcome = Outcome()

    def run() -> None:
        try:
            sock, _ = listener.accept()
            link = IsclSocket.accept(sock, key_holder=holder, config=config, timeouts=SAFETY_NET)
            with link:
                outcome.value = script(link)
        except BaseException as exc:  # noqa: BLE001 - examined by the test
            outcome.error = exc

    thread = threading.Thread(target=run, name="iscl-server", daemon=True)
    thread.start()
    return thread, outcome


def run_link(
    server_holder: KeyHolder,
    client_holder: KeyHolder,
    server_script: Script,
    client_script: Script,
    server_config: Config | None = None,
    client_config: Config | None = None,
    *,
    via: Callable[[int], int] | None = None,
) -> tuple[Outcome, Outcome]:
    """Server in a thread (IsclSocket.accept), client here (IsclSocket.connect); both outcomes.

    ``via(server_port)`` may return another port to connect to (a proxy in front of the server).
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        port = listener.getsockname()[1]
        thread, server = serve_once(listener, server_holder, server_config, server_script)
        client = Outcome()
        try:
            link = IsclSocket.connect(
                "127.0.0.1",
                via(port) if via else port,
                key_holder=client_holder,
                config=client_config,
                timeouts=SAFETY_NET,
            )
            with link:
                client.value = client_script(link)
        except BaseException as exc:  # noqa: BLE001 - examined by the test
            client.error = exc
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "the server thread did not finish"
    return server, client


def _wait_for_close(link: IsclSocket) -> None:
    assert link.recv() is None, "expected the peer to disconnect the line"


# --- every suite, every size, both directions ---------------------------------------------------


@pytest.mark.parametrize("record_keys", ["host", "token"])
@pytest.mark.parametrize(("encryption", "mac", "enc_key_id"), SUITES)
def test_every_suite_carries_messages_both_ways(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], profile: Profile, record_keys: str,
    encryption: Encryption, mac: Mac, enc_key_id: int,
) -> None:  # fmt: skip
    config = cfg(profile, encryption=encryption, mac=mac, enc_key_id=enc_key_id)
    sizes = [0, 1, wire.MAX_BLOCK, wire.MAX_BLOCK + 1, config.max_message]
    to_server = [os.urandom(n) for n in sizes]
    to_client = [os.urandom(n) for n in sizes]

    def server_script(link: IsclSocket) -> tuple[list[bytes | None], Any, State]:
        got = []
        for data in to_client:
            got.append(link.recv())
            link.send(data)
        _wait_for_close(link)
        return got, link.parameters, link.connection.state

    def client_script(link: IsclSocket) -> tuple[list[bytes | None], Any]:
        got = []
        for data in to_server:
            link.send(data)
            got.append(link.recv())
        link.close()
        assert link.connection.state is State.CLOSED
        return got, link.parameters

    server, client = run_link(
        holders(hospitals.a, record_keys), holders(hospitals.b, record_keys),
        server_script, client_script, config, config,
    )  # fmt: skip
    server_got, server_parameters, server_state = server.get()
    client_got, client_parameters = client.get()
    assert [len(m) for m in server_got] == sizes and server_got == to_server
    assert [len(m) for m in client_got] == sizes and client_got == to_client
    assert server_state is State.CLOSED
    for parameters in (server_parameters, client_parameters):
        assert (parameters.encryption, parameters.mac, parameters.enc_key_id) == (encryption, mac, enc_key_id)
        assert parameters.version == "MEDIS-ISCL V1.00"
        assert parameters.block_length == wire.MAX_BLOCK and parameters.auth_key_id == 1
        assert parameters.peer_auth_data == DEFAULT_AUTH_DATA[profile] and parameters.profile is profile


@pytest.mark.parametrize(
    ("server_block", "client_block", "agreed"),
    [(wire.MAX_BLOCK, 1024, 1024), (512, wire.MAX_BLOCK, 512), (8, 8, 8)],
)
def test_the_smaller_block_length_is_agreed_and_used(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], server_block: int, client_block: int, agreed: int
) -> None:
    message = os.urandom(5 * agreed + 3)

    def server_script(link: IsclSocket) -> tuple[int, bytes | None]:
        got = link.recv()
        link.send(got[::-1] if got else b"")
        _wait_for_close(link)
        return link.connection.block_length, got

    def client_script(link: IsclSocket) -> tuple[int, bytes | None]:
        link.send(message)
        got = link.recv()
        link.close()
        return link.connection.block_length, got

    server, client = run_link(
        holders(hospitals.a), holders(hospitals.b), server_script, client_script,
        Config(max_block=server_block, auth_data=b"hospital A"), Config(max_block=client_block, auth_data=b"hospital B"),
    )  # fmt: skip
    assert server.get() == (agreed, message)
    assert client.get() == (agreed, message[::-1])


def test_each_end_sees_the_peers_auth_data_and_key_ids(
    hospitals: Hospitals, holders: Callable[..., KeyHolder]
) -> None:
    server_config = Config(auth_data=b"Hospital A, radiology", enc_key_id=7, auth_key_id=1)
    client_config = Config(auth_data=b"Hospital B, CT room 2", enc_key_id=7, auth_key_id=5)
    server, client = run_link(
        holders(hospitals.a), holders(hospitals.b),
        lambda link: (link.recv(), link.parameters, _wait_for_close(link))[:2],
        lambda link: (link.send(b"study 1.2.3"), link.parameters, link.close())[1],
        server_config, client_config,
    )  # fmt: skip
    got, server_parameters = server.get()
    client_parameters = client.get()
    assert got == b"study 1.2.3"
    assert server_parameters.peer_auth_data == b"Hospital B, CT room 2"
    assert client_parameters.peer_auth_data == b"Hospital A, radiology"
    # The client picks the authentication key pair; both ends use it.
    assert server_parameters.auth_key_id == client_parameters.auth_key_id == 5
    assert server_parameters.enc_key_id == client_parameters.enc_key_id == 7


def test_both_ends_send_at_once(hospitals: Hospitals, holders: Callable[..., KeyHolder]) -> None:
    """Requests cross on the wire; each end answers the other's while waiting for its own answer."""
    to_server = [os.urandom(n) for n in (0, 100, 3000)]
    to_client = [os.urandom(n) for n in (5, 0, 2000, 17)]

    def server_script(link: IsclSocket) -> list[bytes | None]:
        for data in to_client:
            link.send(data)
        got = [link.recv() for _ in to_server]
        _wait_for_close(link)
        return got

    def client_script(link: IsclSocket) -> list[bytes | None]:
        for data in to_server:
            link.send(data)
        got = [link.recv() for _ in to_client]
        link.close()
        return got

    server, client = run_link(holders(hospitals.a), holders(hospitals.b), server_script, client_script)
    assert server.get() == to_server
    assert client.get() == to_client


# --- line disconnection ---------------------------------------------------------------------------


def test_the_client_disconnects_the_line(hospitals: Hospitals, holders: Callable[..., KeyHolder]) -> None:
    def server_script(link: IsclSocket) -> tuple[bytes | None, bytes | None, State, int]:
        first = link.recv()
        second = link.recv()
        return first, second, link.connection.state, link._sock.fileno()

    def client_script(link: IsclSocket) -> tuple[State, int]:
        link.send(b"last words")
        link.close()
        return link.connection.state, link._sock.fileno()

    server, client = run_link(holders(hospitals.a), holders(hospitals.b), server_script, client_script)
    assert server.get() == (b"last words", None, State.CLOSED, -1)
    assert client.get() == (State.CLOSED, -1)


def test_the_server_disconnects_the_line(hospitals: Hospitals, holders: Callable[..., KeyHolder]) -> None:
    def server_script(link: IsclSocket) -> State:
        link.send(b"goodbye")
        link.close()
        return link.connection.state

    def client_script(link: IsclSocket) -> tuple[bytes | None, bytes | None, State]:
        return link.recv(), link.recv(), link.connection.state

    server, client = run_link(holders(hospitals.a), holders(hospitals.b), server_script, client_script)
    assert server.get() is State.CLOSED
    assert client.get() == (b"goodbye", None, State.CLOSED)


def test_a_refused_close_leaves_the_link_up(hospitals: Hospitals, holders: Callable[..., KeyHolder]) -> None:
    def server_script(link: IsclSocket) -> tuple[bytes | None, State]:
        got = link.recv()  # the client's close request is refused meanwhile
        link.close()  # our own close is accepted: accept_close governs only the peer's requests
        return got, link.connection.state

    def client_script(link: IsclSocket) -> tuple[State, bytes | None]:
        with pytest.raises(RemoteProtocolError) as caught:
            link.close()
        assert caught.value.code is ErrorCode.PEER_REFUSED_CLOSE
        state = link.connection.state
        link.send(b"still here")
        return state, link.recv()

    server, client = run_link(
        holders(hospitals.a), holders(hospitals.b), server_script, client_script, Config(accept_close=False)
    )
    assert server.get() == (b"still here", State.CLOSED)
    assert client.get() == (State.READY, None)


@pytest.mark.parametrize("who", ["client", "server"])
def test_a_dropped_line_is_connection_lost(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], who: str
) -> None:
    """abort() (CloseForced) without the disconnection protocol: the other end's recv fails."""

    def dropper(link: IsclSocket) -> None:
        link.send(b"one message, then the line drops")
        link.abort()

    def survivor(link: IsclSocket) -> bytes | None:
        first = link.recv()
        assert first == b"one message, then the line drops"
        return link.recv()

    scripts = (survivor, dropper) if who == "client" else (dropper, survivor)
    server, client = run_link(holders(hospitals.a), holders(hospitals.b), *scripts)
    dropped, survived = (client, server) if who == "client" else (server, client)
    assert dropped.get() is None
    error = survived.failed(RemoteProtocolError, ErrorCode.CONNECTION_LOST)
    assert "without disconnecting" in str(error)


# --- refused messages -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "server_max"),
    [(1001, 1000), (3 << 20, 1 << 20)],  # the second is sealed ahead in steps while the refusal is on its way
    ids=["short", "long"],
)
def test_a_message_longer_than_the_peer_accepts_is_refused_and_the_link_survives(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], length: int, server_max: int
) -> None:
    def server_script(link: IsclSocket) -> tuple[bytes | None, Any]:
        got = link.recv()
        _wait_for_close(link)
        return got, link.connection.peer_request

    def client_script(link: IsclSocket) -> MessageRefusedError:
        with pytest.raises(MessageRefusedError) as caught:
            link.send(bytes(length))
        link.send(b"x" * server_max)
        link.close()
        return caught.value

    server, client = run_link(
        holders(hospitals.a),
        holders(hospitals.b),
        server_script,
        client_script,
        Config(max_message=server_max),
        Config(max_message=4 << 20),
    )
    got, peer_request = server.get()
    assert got == b"x" * server_max
    assert peer_request.length == length  # what the server refused (GetPeer...ISCL in the SDK)
    refused = client.get()
    assert refused.code is ErrorCode.PEER_LENGTH_TOO_SMALL
    assert (refused.length, refused.peer_max_length) == (length, server_max)


def test_a_message_longer_than_this_end_allows_is_refused_locally_and_the_link_survives(
    hospitals: Hospitals, holders: Callable[..., KeyHolder]
) -> None:
    def client_script(link: IsclSocket) -> LocalProtocolError:
        with pytest.raises(LocalProtocolError) as caught:
            link.send(bytes(1001))
        link.send(b"y" * 1000)
        link.close()
        return caught.value

    server, client = run_link(
        holders(hospitals.a), holders(hospitals.b),
        lambda link: (link.recv(), _wait_for_close(link))[0], client_script, None, Config(max_message=1000),
    )  # fmt: skip
    assert server.get() == b"y" * 1000
    assert client.get().code is ErrorCode.LOCAL_LENGTH_TOO_SMALL


MISMATCHES = [
    pytest.param(Config(encryption=Encryption.NONE), Config(), id="encryption"),
    pytest.param(Config(mac=Mac.MD5), Config(mac=Mac.DES_MAC), id="mac"),
    pytest.param(Config(enc_key_id=2), Config(enc_key_id=1), id="enc-key-id"),
    pytest.param(Config(enc_key_id=wire.SESSION_KEYS), Config(enc_key_id=1), id="session-keys"),
]


@pytest.mark.parametrize(("server_config", "client_config"), MISMATCHES)
def test_an_algorithm_mismatch_is_refused_both_ways_and_the_link_survives(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], server_config: Config, client_config: Config
) -> None:
    def refused(link: IsclSocket) -> MessageRefusedError:
        with pytest.raises(MessageRefusedError) as caught:
            link.send(b"protected the way this end likes it")
        return caught.value

    # The server disconnects: the client's request reaches it before the client's answer to its own
    # request does, so once its send has been refused it has answered the client's request too and is
    # idle. (A close that arrives while this end's request is still unanswered is refused as busy.)
    # peer_request is read once the line is down, when each end has seen the other's request.
    def server_script(link: IsclSocket) -> tuple[MessageRefusedError, wire.TransmissionRq | None]:
        error = refused(link)
        link.close()
        return error, link.connection.peer_request

    def client_script(link: IsclSocket) -> tuple[MessageRefusedError, wire.TransmissionRq | None]:
        error = refused(link)
        _wait_for_close(link)
        return error, link.connection.peer_request

    server, client = run_link(
        holders(hospitals.a), holders(hospitals.b), server_script, client_script, server_config, client_config
    )
    for (refused, peer_request), peer_config in (
        (server.get(), client_config),
        (client.get(), server_config),
    ):
        assert refused.code is ErrorCode.TRANSMISSION_MISMATCH
        assert refused.length == len(b"protected the way this end likes it")
        assert peer_request is not None
        assert (peer_request.encryption, peer_request.mac, peer_request.key_id) == (
            peer_config.encryption, peer_config.mac, peer_config.enc_key_id,
        )  # fmt: skip


# --- authentication failures ----------------------------------------------------------------------


@pytest.mark.parametrize("stranger_is", ["server", "client"])
def test_a_different_authentication_key_fails_at_both_ends(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], stranger_is: str
) -> None:
    """Auth key 1 differs: the server refuses pass 2, and its NAK'd pass 3 tells the client why."""
    stranger, hospital = holders(hospitals.stranger), holders(hospitals.b)
    server_holder, client_holder = (stranger, hospital) if stranger_is == "server" else (hospital, stranger)
    server, client = run_link(server_holder, client_holder, lambda link: None, lambda link: None)
    assert "different keys" in str(server.failed(RemoteProtocolError, ErrorCode.AUTHENTICATION_FAILED))
    assert "different" in str(client.failed(RemoteProtocolError, ErrorCode.AUTHENTICATION_FAILED))


def test_an_authentication_key_id_the_server_does_not_allow_is_bad_option(
    hospitals: Hospitals, holders: Callable[..., KeyHolder]
) -> None:
    server, client = run_link(
        holders(hospitals.a), holders(hospitals.b), lambda link: None, lambda link: None,
        Config(allowed_auth_key_ids=frozenset({1, 3})), Config(auth_key_id=2),
    )  # fmt: skip
    assert "authentication key 2" in str(server.failed(RemoteProtocolError, ErrorCode.BAD_OPTION))
    client.failed(RemoteProtocolError, ErrorCode.BAD_OPTION)


def test_an_authentication_key_missing_on_the_server_token(
    hospitals: Hospitals, holders: Callable[..., KeyHolder]
) -> None:
    server, client = run_link(
        holders(hospitals.stranger), holders(hospitals.b), lambda link: None, lambda link: None,
        None, Config(auth_key_id=3),
    )  # fmt: skip
    error = server.failed(KeyHolderError, ErrorCode.KEY_NOT_FOUND)
    assert "'iscl-auth-3'" in str(error) and hospitals.stranger.label in str(error)
    client.failed(RemoteProtocolError, ErrorCode.REMOTE_KEY_HOLDER)


def test_an_authentication_key_missing_on_the_client_token(
    hospitals: Hospitals, holders: Callable[..., KeyHolder]
) -> None:
    server, client = run_link(
        holders(hospitals.b), holders(hospitals.stranger), lambda link: None, lambda link: None,
        None, Config(auth_key_id=3),
    )  # fmt: skip
    error = client.failed(KeyHolderError, ErrorCode.KEY_NOT_FOUND)
    assert "'iscl-auth-3'" in str(error) and hospitals.stranger.label in str(error)
    server.failed(RemoteProtocolError, ErrorCode.REMOTE_KEY_HOLDER)


def _send_under_enc_key_3(hospitals: Hospitals, holders: Callable[..., KeyHolder]) -> tuple[Outcome, Outcome]:
    """Hospital B sends under encryption key 3 to the stranger, whose token lacks it (auth key 2 is shared)."""
    config = Config(auth_key_id=2, enc_key_id=3)

    def sender(link: IsclSocket) -> bytes | None:
        link.send(b"a report for the stranger")
        return link.recv()

    return run_link(
        holders(hospitals.stranger), holders(hospitals.b), lambda link: link.recv(), sender, config, config
    )


def test_an_encryption_key_missing_on_the_receiving_token_is_named(
    hospitals: Hospitals, holders: Callable[..., KeyHolder]
) -> None:
    receiver, _ = _send_under_enc_key_3(hospitals, holders)
    error = receiver.failed(KeyHolderError, ErrorCode.KEY_NOT_FOUND)
    assert "'iscl-enc-3'" in str(error) and hospitals.stranger.label in str(error)


def test_the_sender_learns_that_the_receivers_token_lacks_the_encryption_key(
    hospitals: Hospitals, holders: Callable[..., KeyHolder]
) -> None:
    _, sender = _send_under_enc_key_3(hospitals, holders)
    assert isinstance(sender.error, IsclError), sender
    assert sender.error.code is ErrorCode.REMOTE_KEY_HOLDER, sender.error


# --- a peer that breaks off or lies ---------------------------------------------------------------


@pytest.mark.parametrize("cut", ["half-the-blocks", "inside-a-block", "all-but-the-mac", "request-only"])
def test_a_peer_that_closes_mid_message_delivers_nothing(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], cut: str
) -> None:
    config = Config()
    message = os.urandom(6 * wire.MAX_BLOCK + 100)  # 7 data blocks
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        received: list[bytes | None] = []
        thread, server = serve_once(
            listener, holders(hospitals.a), config, lambda link: received.append(link.recv())
        )
        sock, conn = raw_client_handshake(listener.getsockname()[1], holders(hospitals.b), config)
        with sock:
            stream = raw_sealed_message(sock, conn, message)
            frames = split_frames(stream)
            blocks = [f for f in frames if f.is_(MessageId.MESSAGE_TRANSMISSION_NOTIF)]
            assert len(blocks) == 7 and frames[-1].is_(MessageId.MAC_TRANSMISSION_NOTIF)
            sent = {
                "half-the-blocks": b"".join(f.raw for f in blocks[:3]),
                "inside-a-block": b"".join(f.raw for f in blocks[:3])
                + blocks[3].raw[: len(blocks[3].raw) // 2],
                "all-but-the-mac": b"".join(f.raw for f in blocks),
                "request-only": b"",
            }[cut]
            sock.sendall(sent)
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    error = server.failed(RemoteProtocolError, ErrorCode.CONNECTION_LOST)
    assert "in the middle of a message" in str(error)
    assert received == []


def test_messages_verified_before_a_failure_are_still_delivered(
    hospitals: Hospitals, holders: Callable[..., KeyHolder]
) -> None:
    """A whole message, then garbage, in one write: the message is delivered, then the error raised."""
    config = Config()
    first = os.urandom(3000)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        received: list[bytes | None] = []

        def server_script(link: IsclSocket) -> None:
            while True:
                received.append(link.recv())

        thread, server = serve_once(listener, holders(hospitals.a), config, server_script)
        sock, conn = raw_client_handshake(listener.getsockname()[1], holders(hospitals.b), config)
        with sock:
            stream = raw_sealed_message(sock, conn, first)
            sock.sendall(stream + header(0x0BADBAD0, 0))
            thread.join(TIMEOUT)
        assert not thread.is_alive()
    server.failed(RemoteProtocolError, ErrorCode.BAD_MESSAGE_ID)
    assert received == [first]


def _flip_a_data_block(direction: str, which: str) -> Callable[[str, Frame], bytes]:
    """Flip a bit of the first or the last data block going ``direction``."""
    seen = []

    def tamper(way: str, frame: Frame) -> bytes:
        if way == direction and frame.is_(MessageId.MESSAGE_TRANSMISSION_NOTIF):
            seen.append(frame)
            if (which == "first" and len(seen) == 1) or (which == "last" and len(seen) == 3):
                return frame.flip_bit(0 if which == "first" else -1, 3)
        return frame.raw

    return tamper


@pytest.mark.parametrize("which", ["first", "last"])
@pytest.mark.parametrize("direction", ["c2s", "s2c"])
@pytest.mark.parametrize(("encryption", "mac", "enc_key_id"), MAC_SUITES)
def test_a_bit_flipped_by_a_man_in_the_middle_fails_both_ends(
    hospitals: Hospitals, holders: Callable[..., KeyHolder],
    mitm: Callable[[int, Callable[[str, Frame], bytes]], TamperingProxy],
    profile: Profile, direction: str, which: str, encryption: Encryption, mac: Mac, enc_key_id: int,
) -> None:  # fmt: skip
    config = cfg(profile, encryption=encryption, mac=mac, enc_key_id=enc_key_id)
    message = os.urandom(3 * wire.MAX_BLOCK - 5)
    delivered: list[bytes | None] = []

    def sender(link: IsclSocket) -> bytes | None:
        link.send(message)  # the blocks are out: the sender does not know yet
        return link.recv()  # ... until the receiver drops the line

    def receiver(link: IsclSocket) -> None:
        delivered.append(link.recv())

    scripts = (receiver, sender) if direction == "c2s" else (sender, receiver)
    server, client = run_link(
        holders(hospitals.a), holders(hospitals.b), *scripts, config, config,
        via=lambda port: mitm(port, _flip_a_data_block(direction, which)).port,
    )  # fmt: skip
    sending, receiving = (client, server) if direction == "c2s" else (server, client)
    if which == "first" and first_message_malleable(profile, encryption, mac):
        (altered,) = delivered  # V1.00's documented gap: the altered first message is delivered
        assert altered is not None and altered != message and altered[16:] == message[16:]
        return
    assert "integrity" in str(receiving.failed(RemoteProtocolError, ErrorCode.BAD_MAC))
    sending.failed(RemoteProtocolError, ErrorCode.CONNECTION_LOST)
    assert delivered == []


def test_a_handshake_altered_in_transit_fails_in_the_hardened_profile(
    hospitals: Hospitals, holders: Callable[..., KeyHolder],
    mitm: Callable[[int, Callable[[str, Frame], bytes]], TamperingProxy],
) -> None:  # fmt: skip
    """Changing the server's auth data breaks the handshake MACs that bind the transcript (V1.00 has
    none: its handshake's parameters travel unprotected, docs/security.md)."""

    def tamper(direction: str, frame: Frame) -> bytes:
        if frame.is_(MessageId.MUTUAL_AUTH_RP):
            return frame.flip_bit(-1, 0)
        return frame.raw

    hardened = Config(profile=Profile.HARDENED)
    server, client = run_link(
        holders(hospitals.a), holders(hospitals.b), lambda link: None, lambda link: None, hardened, hardened,
        via=lambda port: mitm(port, tamper).port,
    )  # fmt: skip
    assert "altered in transit" in str(client.failed(RemoteProtocolError, ErrorCode.AUTHENTICATION_FAILED))
    server.failed(RemoteProtocolError, ErrorCode.CONNECTION_LOST)


# --- talking to something that is not ISCL --------------------------------------------------------


def test_a_plain_http_client_is_bad_message_id(
    hospitals: Hospitals, holders: Callable[..., KeyHolder]
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        thread, server = serve_once(listener, holders(hospitals.a), None, lambda link: None)
        with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as http:
            http.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n")
            answer = b""
            with contextlib.suppress(ConnectionResetError):
                while data := http.recv(1 << 16):
                    answer += data
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    assert "unknown message id" in str(server.failed(RemoteProtocolError, ErrorCode.BAD_MESSAGE_ID))
    # All the HTTP client saw was the server's line connection check request; then the line closed.
    (frame,) = split_frames(answer)
    assert frame.is_(MessageId.LINE_CONNECTION_CHECK_RQ)
    assert wire.LineConnectionRq.decode(frame.payload) == wire.LineConnectionRq(wire.MAX_BLOCK)


GARBAGE = [
    pytest.param(
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", ErrorCode.BAD_MESSAGE_ID, id="http"
    ),
    pytest.param(b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n", ErrorCode.BAD_MESSAGE_ID, id="ssh-banner"),
    pytest.param(bytes(range(256)) * 4, ErrorCode.BAD_MESSAGE_ID, id="binary"),
    pytest.param(  # an ISCL header that announces a gigabyte: refused before any of it is buffered
        header(MessageId.LINE_CONNECTION_CHECK_RQ, 1 << 30) + bytes(64),
        ErrorCode.BAD_LENGTH,
        id="huge-length",
    ),
    pytest.param(  # a real message id, but not the one a client waits for first
        wire.frame(MessageId.MESSAGE_TRANSMISSION_NOTIF, bytes(8)),
        ErrorCode.BAD_MESSAGE_ID,
        id="out-of-order",
    ),
    pytest.param(b"220 smtp ready\r\n", ErrorCode.CONNECTION_LOST, id="short-then-close"),
    pytest.param(
        wire.frame(
            MessageId.LINE_CONNECTION_CHECK_RQ, wire.LineConnectionRq(8160, b"MEDIS-ISCL V2.00").encode()
        ),
        ErrorCode.BAD_VERSION,
        id="other-version",
    ),
    pytest.param(
        wire.frame(MessageId.LINE_CONNECTION_CHECK_RQ, wire.LineConnectionRq(4).encode()),
        ErrorCode.BAD_BLOCK_LENGTH,
        id="tiny-block",
    ),
]


@pytest.mark.parametrize(("garbage", "code"), GARBAGE)
def test_a_client_of_a_server_that_is_not_iscl(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], garbage: bytes, code: ErrorCode
) -> None:
    heard: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)

        def not_iscl() -> None:
            sock, _ = listener.accept()
            with sock:
                sock.settimeout(TIMEOUT)
                sock.sendall(garbage)
                sock.shutdown(socket.SHUT_WR)
                with contextlib.suppress(ConnectionResetError):
                    while data := sock.recv(1 << 16):
                        heard.append(data)

        thread = threading.Thread(target=not_iscl, daemon=True)
        thread.start()
        with pytest.raises(RemoteProtocolError) as caught:
            IsclSocket.connect(*listener.getsockname(), key_holder=holders(hospitals.b), timeouts=SAFETY_NET)
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    assert caught.value.code is code, caught.value
    if code is ErrorCode.BAD_VERSION:  # the client says why with a NAK'd response (V1.00: in the status)
        (nak,) = split_frames(b"".join(heard))
        assert nak.is_(MessageId.LINE_CONNECTION_CHECK_RP)
        assert (nak.option, nak.err_no) == (wire.NAK, 0)
        assert wire.LineConnectionRp.decode(nak.payload).status == ErrorCode.BAD_VERSION
    else:
        assert heard == []  # nothing but silence for garbage


# --- key holders of two tokens in two threads ---------------------------------------------------


def test_two_tokens_in_two_threads(hospitals: Hospitals, softhsm: SoftHsm) -> None:
    """Both hospitals' Pkcs11KeyHolders in one process, each busy in its own thread, do not crash it:
    python-pkcs11 initialises the module without its own locking, so the key holder serialises calls
    per module."""
    code = f"""
import threading
from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder
holders = [Pkcs11KeyHolder({hospitals.a.label!r}, {hospitals.a.pin!r}),
           Pkcs11KeyHolder({hospitals.b.label!r}, {hospitals.b.pin!r}, record_keys="token")]
def work(holder):
    for _ in range(2000):
        challenge = holder.get_challenge(1)
        assert holder.external_authenticate(1, challenge, holder.internal_authenticate(1, challenge))
        holder.derive_key(1, challenge)
threads = [threading.Thread(target=work, args=(holder,)) for holder in holders]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print("survived")
"""
    env = {**softhsm.tool_env(), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert (done.returncode, done.stdout.strip()) == (0, "survived"), done.stderr[-2000:]
