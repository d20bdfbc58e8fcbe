"""Who may connect to a tunnel: --allow-from on both roles, and --proxy-protocol (the real client a load
balancer's PROXY protocol header names is the one logged and checked). A refused connection costs no
handshake, is closed before anything is sent, and is logged once a minute per host; a health check
(a LOCAL header) is not logged at all."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from iscl_hsm.dicom.gateway import Mode, Tunnel
from iscl_hsm.engine import Config
from iscl_hsm.keyholder.base import KeyHolder
from iscl_hsm.transport.admission import Admission, parse_network
from tests.proxy_headers import HAPROXY_LOCAL, relayed

from ..conftest import Hospitals, raw_client_handshake
from .conftest import TIMEOUT, TunnelCommand, parse_line, scu
from .test_gateway_cli import link_lines as command_link_lines

PROXY_HINT = (
    "; is the load balancer configured with send-proxy-v2 (and check-send-proxy for its health checks),"
    " or should --proxy-protocol be off?"
)


@pytest.fixture
def application() -> Iterator[socket.socket]:
    """A listening socket standing for the DICOM application a tunnel forwards to."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        yield listener


def closed_unanswered(port: int, sent: bytes = b"") -> None:
    """Connect, send ``sent``, and expect the tunnel to close the connection without sending a byte (with
    RST rather than FIN when it left some of ``sent`` unread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(sent)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1 << 16) == b""


def server_tunnel(
    start_tunnel: Callable[..., Tunnel], application: socket.socket, holder: KeyHolder, admission: Admission
) -> Tunnel:
    return start_tunnel(Mode.SERVER, application.getsockname()[1], holder, Config(), admission=admission)


def test_the_real_client_a_proxy_names_is_logged_for_links_and_failed_handshakes(
    start_tunnel: Callable[..., Tunnel], application: socket.socket, hospitals: Hospitals,
    holders: Callable[..., KeyHolder], link_lines: Callable[[int], list[str]],
) -> None:  # fmt: skip
    server = server_tunnel(start_tunnel, application, holders(hospitals.a), Admission(proxy_protocol=True))
    port = server.address.port

    sock, _ = raw_client_handshake(port, holders(hospitals.b), Config(), preamble=relayed("192.0.2.7", 4242))
    forwarded, _ = application.accept()  # the link is up end to end
    sock.close()
    link_lines(1)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(relayed("198.51.100.9", 5151) + bytes(64))  # a header, then no ISCL handshake
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(1 << 16):
                pass

    link, failed = map(parse_line, link_lines(2))
    forwarded.close()
    assert (link["source"], link["auth_key"]) == ("192.0.2.7:4242", "1")
    assert link["result"].startswith("aborted: ")
    assert (failed["source"], failed["auth_key"]) == ("198.51.100.9:5151", "-")


def test_without_a_header_the_connection_is_dropped_with_one_line_and_no_handshake(
    start_tunnel: Callable[..., Tunnel], application: socket.socket, hospitals: Hospitals,
    holders: Callable[..., KeyHolder], link_lines: Callable[[int], list[str]],
) -> None:  # fmt: skip
    server = server_tunnel(start_tunnel, application, holders(hospitals.a), Admission(proxy_protocol=True))
    associate_rq = bytes.fromhex("01000000c40001")

    for _ in range(3):  # one line for the three (repeats are counted, not shown)
        closed_unanswered(server.address.port, associate_rq)
    sock, _ = raw_client_handshake(server.address.port, holders(hospitals.b), Config(), preamble=relayed("192.0.2.7", 1))
    sock.close()  # (a link after them: their line was logged before its line)

    lines = [parse_line(line) for line in link_lines(2)]
    assert len(lines) == 2
    refused = lines[0]
    host, _, client_port = refused["source"].rpartition(":")
    assert host == "127.0.0.1" and refused["auth_key"] == "-"
    assert refused["result"] == (
        f"aborted: the connection from 127.0.0.1:{client_port} did not start with a PROXY protocol header"
        f" (it starts with 01){PROXY_HINT}"
    )
    assert lines[1]["source"] == "192.0.2.7:1"


def test_a_health_check_is_closed_without_a_line(
    start_tunnel: Callable[..., Tunnel], application: socket.socket, hospitals: Hospitals,
    holders: Callable[..., KeyHolder], link_lines: Callable[[int], list[str]],
) -> None:  # fmt: skip
    server = server_tunnel(start_tunnel, application, holders(hospitals.a), Admission(proxy_protocol=True))

    closed_unanswered(server.address.port, HAPROXY_LOCAL)
    sock, _ = raw_client_handshake(server.address.port, holders(hospitals.b), Config(), preamble=relayed("192.0.2.7", 2))
    sock.close()

    (line,) = map(parse_line, link_lines(1))  # the link's only: the health check logged nothing
    assert line["source"] == "192.0.2.7:2"


def test_allow_from_at_the_server_tunnel_checks_the_socket_peer_or_the_real_client(
    start_tunnel: Callable[..., Tunnel], application: socket.socket, hospitals: Hospitals,
    holders: Callable[..., KeyHolder], link_lines: Callable[[int], list[str]],
) -> None:  # fmt: skip
    holder = holders(hospitals.a)
    direct = server_tunnel(start_tunnel, application, holder, Admission(allow_from=(parse_network("10.0.0.0/8"),)))
    proxied = server_tunnel(start_tunnel, application, holder, Admission(
        allow_from=(parse_network("192.0.2.0/24"),), proxy_protocol=True,
    ))  # fmt: skip

    closed_unanswered(direct.address.port)  # 127.0.0.1: not allowed, not even a handshake message
    closed_unanswered(proxied.address.port, relayed("198.51.100.9", 7))
    sock, _ = raw_client_handshake(proxied.address.port, holders(hospitals.b), Config(), preamble=relayed("192.0.2.7", 8))
    sock.close()  # 192.0.2.7 is allowed although the socket's peer, 127.0.0.1, is not

    first, second, allowed = map(parse_line, link_lines(3))
    assert first["result"] == "aborted: 127.0.0.1 is not in --allow-from (10.0.0.0/8); the connection was dropped"
    assert (second["source"], second["result"]) == (
        "198.51.100.9:7", "aborted: 198.51.100.9 is not in --allow-from (192.0.2.0/24); the connection was dropped"
    )
    assert allowed["source"] == "192.0.2.7:8" and allowed["auth_key"] == "1"


def test_allow_from_at_the_client_tunnel_drops_the_application_before_any_link(
    start_tunnel: Callable[..., Tunnel], application: socket.socket, hospitals: Hospitals,
    holders: Callable[..., KeyHolder], link_lines: Callable[[int], list[str]],
) -> None:  # fmt: skip
    client = start_tunnel(Mode.CLIENT, application.getsockname()[1], holders(hospitals.b), Config(),
                          admission=Admission(allow_from=(parse_network("::1"), parse_network("10.0.0.0/8"))))

    closed_unanswered(client.address.port, bytes.fromhex("01000000c40001"))

    (line,) = map(parse_line, link_lines(1))
    assert line["result"] == (
        "aborted: 127.0.0.1 is not in --allow-from (::1/128, 10.0.0.0/8); the connection was dropped"
    )
    application.setblocking(False)
    with pytest.raises(BlockingIOError):  # no ISCL link was even attempted
        application.accept()


def test_a_client_tunnel_behind_a_load_balancer_names_the_real_application(
    start_tunnel: Callable[..., Tunnel], application: socket.socket, hospitals: Hospitals,
    holders: Callable[..., KeyHolder], link_lines: Callable[[int], list[str]],
) -> None:  # fmt: skip
    server = server_tunnel(start_tunnel, application, holders(hospitals.a), Admission())
    client = start_tunnel(Mode.CLIENT, server.address.port, holders(hospitals.b), Config(),
                          admission=Admission(allow_from=(parse_network("192.0.2.0/24"),), proxy_protocol=True))

    with socket.create_connection(("127.0.0.1", client.address.port), timeout=TIMEOUT) as app:
        app.sendall(relayed("192.0.2.7", 104) + b"A-ASSOCIATE")
        forwarded, _ = application.accept()
        with forwarded:
            assert forwarded.recv(16) == b"A-ASSOCIATE"  # the header went no further than the client tunnel

    lines = {line["target"]: line for line in map(parse_line, link_lines(2))}
    assert lines[str(server.address)]["source"] == "192.0.2.7:104"


def test_a_direct_client_at_a_proxy_protocol_server_command_gets_one_line_and_no_traceback(
    tmp_path: Path, hospitals: Hospitals, tunnel_command: Callable[..., TunnelCommand], application: socket.socket,
) -> None:  # fmt: skip
    """The options from the config file; an ISCL client tunnel connecting without the load balancer waits
    for the server to speak, which waits for the header until the handshake timeout."""
    config = tmp_path / "server.toml"
    config.write_text(f'forward = "127.0.0.1:{application.getsockname()[1]}"\nproxy-protocol = true\n'
                      'allow-from = ["127.0.0.0/8", "::1"]\nhandshake-timeout = 1\n')  # fmt: skip
    server = tunnel_command("server", hospitals.a, "--config", config, "--listen", "127.0.0.1:0")
    client = tunnel_command("client", hospitals.b, "--listen", "127.0.0.1:0", "--connect", f"127.0.0.1:{server.port}")

    echo = scu("echoscu", client.port)
    status, output = server.stop()
    client.stop()

    assert echo.returncode != 0
    assert status == 0 and "Traceback" not in output, output
    (line,) = command_link_lines(output)
    assert line["result"] == (
        f"aborted: the connection from {line['source']} sent no complete PROXY protocol header within 1 s{PROXY_HINT}"
    )
