"""Bad input at a tunnel: each case logs its exact link line, and the local application sees an aborted
association (its TCP connection is reset, never closed in order). Every case that reaches the ISCL
engine runs in both wire profiles; a client tunnel that never hears an ISCL server times out before
any profile matters."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from iscl_hsm.dicom.gateway import Mode, Tunnel
from iscl_hsm.engine import Config, Profile
from iscl_hsm.keyholder.base import KeyHolder
from iscl_hsm.wire import Encryption, Mac, MessageId
from tests.helpers import Frame, first_message_malleable

from ..conftest import Hospitals, TamperingProxy
from .conftest import TIMEOUT, StoreScp, TunnelPair, free_port, parse_line, scu, via_proxy

ECHO_RESET = re.compile(
    r"F: Association Request Failed: 0006:(0317 Peer aborted Association \(or never connected\)"
    r"|031d TCP I/O Error \(Connection reset by peer\))"
)
"""What echoscu says when its connection is reset before or after it sent its association request."""


def assert_reset(port: int) -> None:
    """Connect like a DICOM application, send the start of an A-ASSOCIATE-RQ, expect RST (not FIN)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(bytes.fromhex("01000000") + bytes(8))
        with pytest.raises(ConnectionResetError):
            while sock.recv(1 << 16):
                pass


def test_plain_dicom_client_at_the_server_tunnel(
    storescp: StoreScp, start_tunnel: Callable[..., Tunnel], hospitals: Hospitals,
    holders: Callable[..., KeyHolder], link_lines: Callable[[int], list[str]], profile: Profile,
) -> None:  # fmt: skip
    server = start_tunnel(Mode.SERVER, storescp.port, holders(hospitals.a), Config(profile=profile))

    echo = scu("echoscu", server.address.port)

    assert echo.returncode != 0
    # The ISCL server speaks first: echoscu reads its line connection check as a PDU of type 0.
    assert "F: Association Request Failed: 0006:0321 Unrecognized PDU type:  0" in echo.stdout, echo.stdout
    (line,) = map(parse_line, link_lines(1))
    assert (line["target"], line["auth_key"], line["duration"]) == (f"127.0.0.1:{storescp.port}", "-", "-")
    assert line["result"] == (
        "aborted: the peer sent unknown message id 0x00CD0001; is it an ISCL peer? [ISCL 104 BAD_MESSAGE_ID]"
    )
    assert "Association Acknowledged" not in storescp.output()  # nothing reached the application


def test_client_tunnel_pointed_at_a_plain_dicom_peer(
    storescp: StoreScp, start_tunnel: Callable[..., Tunnel], hospitals: Hospitals,
    holders: Callable[..., KeyHolder], link_lines: Callable[[int], list[str]],
) -> None:  # fmt: skip
    client = start_tunnel(Mode.CLIENT, storescp.port, holders(hospitals.b), Config(), connect_timeout=1.5)

    echo = scu("echoscu", client.address.port)
    assert_reset(client.address.port)

    assert echo.returncode != 0
    assert ECHO_RESET.search(echo.stdout), echo.stdout
    for line in map(parse_line, link_lines(2)):
        assert line["result"] == (
            f"aborted: no answer from the ISCL server 127.0.0.1:{storescp.port} within 1.5 s; is it a plain DICOM"
            " port instead of an ISCL tunnel? [ISCL 122 CONNECTION_LOST]"
        )


def test_forward_target_down(
    tunnel_pair: Callable[..., TunnelPair], link_lines: Callable[[int], list[str]], profile: Profile
) -> None:
    down = free_port()
    pair = tunnel_pair(down, Config(profile=profile))

    echo = scu("echoscu", pair.client.address.port)
    assert_reset(pair.client.address.port)

    assert echo.returncode != 0
    assert ECHO_RESET.search(echo.stdout), echo.stdout
    lines = [parse_line(line) for line in link_lines(4)]
    server_lines = [line for line in lines if line["target"] == f"127.0.0.1:{down}"]
    client_lines = [line for line in lines if line not in server_lines]
    assert len(server_lines) == len(client_lines) == 2
    for line in server_lines:
        assert line["auth_key"] == "1" and line["result"] == (
            f"aborted: cannot connect to the forward target 127.0.0.1:{down}: Connection refused"
            " [ISCL 122 CONNECTION_LOST]"
        )
    for line in client_lines:  # (the second client had sent its bytes and was sending them on)
        assert re.fullmatch(
            r"aborted: (the peer closed the connection (without disconnecting|in the middle of a message)|the"
            rf" ISCL link with 127\.0\.0\.1:{pair.server.address.port} failed: Connection (reset by peer|lost))"
            r" \[ISCL 122 CONNECTION_LOST\]",
            line["result"],
        ), line["result"]


@pytest.mark.parametrize(
    ("stranger", "allowed", "server_result", "client_result"),
    [
        pytest.param(
            True, {1, 2, 3, 4, 5, 6, 7, 8},
            "the client's response does not match authentication key 1: the two ends hold different keys at"
            " that index [ISCL 120 AUTHENTICATION_FAILED]",
            "the server rejected our response to its challenge: the two ends hold different keys at"
            " authentication index 1 (status 120) [ISCL 120 AUTHENTICATION_FAILED]",
            id="stranger-token",
        ),
        pytest.param(
            False, {2},
            "the client asked for authentication key 1, which this server does not allow [ISCL 100 BAD_OPTION]",
            "the peer refused mutual authentication (code 100, BAD_OPTION) [ISCL 100 BAD_OPTION]",
            id="allow-key-id",
        ),
    ],
)
def test_authentication_failure(
    storescp: StoreScp, tunnel_pair: Callable[..., TunnelPair], hospitals: Hospitals,
    link_lines: Callable[[int], list[str]], stranger: bool, allowed: set[int], server_result: str,
    client_result: str, profile: Profile,
) -> None:  # fmt: skip
    """The same lines in both profiles. V1.00 tells the client any authentication failure with one NAK
    (status 120) and hardened only a wrong client response; a wrong response is what the stranger gives,
    and a key pair the server does not allow is refused before authentication in both."""
    server_config = Config(profile=profile, allowed_auth_key_ids=frozenset(allowed))
    pair = tunnel_pair(storescp.port, server_config, client_config=Config(profile=profile),
                       client_token=hospitals.stranger if stranger else None)

    echo = scu("echoscu", pair.client.address.port)

    assert echo.returncode != 0
    assert ECHO_RESET.search(echo.stdout), echo.stdout
    lines = [parse_line(line) for line in link_lines(2)]
    (server_line,) = [line for line in lines if line["target"] == f"127.0.0.1:{storescp.port}"]
    (client_line,) = [line for line in lines if line is not server_line]
    assert server_line["result"] == f"aborted: {server_result}"
    assert client_line["result"] == f"aborted: {client_result}"
    assert "Association Acknowledged" not in storescp.output()


# --- idle links -----------------------------------------------------------------------------------


IDLE = (
    "aborted: no data either way for {:g} s, the idle timeout; the link was aborted [ISCL 122 CONNECTION_LOST]"
)


@pytest.fixture
def echo_target() -> Iterator[int]:
    """A plain TCP service that sends back what it gets (a connection at a time); its port."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                with conn, contextlib.suppress(OSError):
                    while data := conn.recv(1 << 16):
                        conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    listener.close()


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size and (more := sock.recv(size - len(data))):
        data += more
    return data


def test_a_link_without_data_is_aborted_after_the_idle_timeout(
    storescp: StoreScp, start_tunnel: Callable[..., Tunnel], hospitals: Hospitals,
    holders: Callable[..., KeyHolder], link_lines: Callable[[int], list[str]], profile: Profile,
) -> None:  # fmt: skip
    config = Config(profile=profile)
    server = start_tunnel(Mode.SERVER, storescp.port, holders(hospitals.a), config)
    client = start_tunnel(Mode.CLIENT, server.address.port, holders(hospitals.b), config, idle_timeout=0.5)

    with socket.create_connection(("127.0.0.1", client.address.port), timeout=TIMEOUT) as sock:
        started = time.monotonic()
        with pytest.raises(ConnectionResetError):  # an aborted association, as with any failure
            sock.recv(1 << 16)
        assert time.monotonic() - started >= 0.5

    client_line, server_line = sorted(
        map(parse_line, link_lines(2)), key=lambda line: line["target"] != str(client.settings.target)
    )
    assert client_line["result"] == IDLE.format(0.5)
    assert server_line["result"].startswith("aborted: ") and "CONNECTION_LOST" in server_line["result"]


def test_data_either_way_keeps_a_link_past_its_idle_timeout(
    echo_target: int, start_tunnel: Callable[..., Tunnel], hospitals: Hospitals,
    holders: Callable[..., KeyHolder], link_lines: Callable[[int], list[str]], profile: Profile,
) -> None:  # fmt: skip
    config = Config(profile=profile)
    server = start_tunnel(Mode.SERVER, echo_target, holders(hospitals.a), config, idle_timeout=1.0)
    client = start_tunnel(Mode.CLIENT, server.address.port, holders(hospitals.b), config, idle_timeout=1.0)

    with socket.create_connection(("127.0.0.1", client.address.port), timeout=TIMEOUT) as sock:
        deadline = time.monotonic() + 2.5  # more than twice the idle timeout
        sent = 0
        while time.monotonic() < deadline:
            sock.sendall(b"ping")
            assert receive_exactly(sock, 4) == b"ping"
            sent += 1
            time.sleep(0.05)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(16) == b""  # the end of the stream, in order

    assert sent > 10
    assert [parse_line(line)["result"] for line in link_lines(2)] == ["closed", "closed"]


@pytest.mark.parametrize("mac", [Mac.DES_MAC, Mac.MD5], ids=["des-mac", "md5"])
def test_the_first_message_of_a_link_under_des_cbc(
    echo_target: int, tunnel_pair: Callable[..., TunnelPair], link_lines: Callable[[int], list[str]],
    mitm: Callable[..., TamperingProxy], profile: Profile, mac: Mac,
) -> None:  # fmt: skip
    """Differs per profile and MAC. A link's first message (in DICOM, the A-ASSOCIATE-RQ: AE titles,
    presentation contexts, user identity) has a malleable MAC in V1.00 with DES-MAC (first_message_malleable):
    a bit flipped in its first cipher block turns that block into garbage and flips the same bit of the
    next block, and the far application gets it as genuine. V1.00's encrypted MD5, and hardened's MAC
    key of its own, catch it."""
    malleable = first_message_malleable(profile, Encryption.DES_CBC, mac)
    assert malleable is (profile is Profile.V100 and mac is Mac.DES_MAC)
    sent = bytes(range(32))  # four DES blocks
    flipped = {"done": False}

    def tamper(direction: str, frame: Frame) -> bytes:
        if direction == "c2s" and frame.is_(MessageId.MESSAGE_TRANSMISSION_NOTIF) and not flipped["done"]:
            flipped["done"] = True
            return frame.flip_bit(0)
        return frame.raw

    pair = tunnel_pair(echo_target, Config(profile=profile, mac=mac), via=via_proxy(mitm, tamper))
    with socket.create_connection(("127.0.0.1", pair.client.address.port), timeout=TIMEOUT) as sock:
        sock.sendall(sent)
        if malleable:
            echoed = receive_exactly(sock, len(sent))  # what the far application got, sent back
        else:
            with pytest.raises(ConnectionResetError):
                receive_exactly(sock, len(sent))

    assert flipped["done"]
    if malleable:
        assert echoed[:8] != sent[:8]  # garbage
        assert echoed[8:] == bytes([sent[8] ^ 1]) + sent[9:]  # the attacker's choice
    else:
        server_line = next(
            line for line in map(parse_line, link_lines(2)) if line["target"] == f"127.0.0.1:{echo_target}"
        )
        assert server_line["result"].startswith("aborted: a message failed its integrity check")
        assert "[ISCL 113 BAD_MAC]" in server_line["result"]
