"""Bad input at a tunnel: each case logs its exact link line, and the local application sees an aborted
association (its TCP connection is reset, never closed in order)."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable

import pytest

from iscl_hsm.dicom.gateway import Mode, Tunnel
from iscl_hsm.engine import Config
from iscl_hsm.keyholder.base import KeyHolder

from ..conftest import Hospitals
from .conftest import TIMEOUT, StoreScp, TunnelPair, free_port, parse_line, scu

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
    holders: Callable[..., KeyHolder], link_lines: Callable[[int], list[str]],
) -> None:  # fmt: skip
    server = start_tunnel(Mode.SERVER, storescp.port, holders(hospitals.a), Config())

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
    tunnel_pair: Callable[..., TunnelPair], link_lines: Callable[[int], list[str]]
) -> None:
    down = free_port()
    pair = tunnel_pair(down, Config())

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
            rf" ISCL link with 127\.0\.0\.1:{pair.server.address.port} failed: Connection reset by peer)"
            r" \[ISCL 122 CONNECTION_LOST\]",
            line["result"],
        ), line["result"]


@pytest.mark.parametrize(
    ("stranger", "server_config", "server_result", "client_result"),
    [
        pytest.param(
            True, Config(),
            "the client's response does not match authentication key 1: the two ends hold different keys at"
            " that index [ISCL 120 AUTHENTICATION_FAILED]",
            "the server rejected our response to its challenge: the two ends hold different keys at"
            " authentication index 1 (status 120) [ISCL 120 AUTHENTICATION_FAILED]",
            id="stranger-token",
        ),
        pytest.param(
            False, Config(allowed_auth_key_ids=frozenset({2})),
            "the client asked for authentication key 1, which this server does not allow [ISCL 100 BAD_OPTION]",
            "the peer refused mutual authentication (code 100, BAD_OPTION) [ISCL 100 BAD_OPTION]",
            id="allow-key-id",
        ),
    ],
)
def test_authentication_failure(
    storescp: StoreScp, tunnel_pair: Callable[..., TunnelPair], hospitals: Hospitals,
    link_lines: Callable[[int], list[str]], stranger: bool, server_config: Config, server_result: str,
    client_result: str,
) -> None:  # fmt: skip
    pair = tunnel_pair(storescp.port, server_config, client_config=Config(),
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
