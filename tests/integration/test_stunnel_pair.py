"""The benchmark's stunnel TLS 1.3 pair (benchmarks/stunnel_pair.py): it carries a connection to its
target, the server end takes TLS 1.3 only and only from a client with a certificate of the run's CA,
and a pair that cannot start says why. Debian's stunnel4 is required: without it these tests fail.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import stunnel_pair
from benchmarks.common import Children
from benchmarks.stunnel_pair import StunnelPair
from benchmarks.tls import Credentials, make_credentials


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    return make_credentials(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A server that echoes each connection's bytes until the peer closes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                while data := connection.recv(65536):
                    connection.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


@pytest.fixture
def pair(credentials: Credentials, echo_port: int, tmp_path: Path) -> Iterator[StunnelPair]:
    if missing := stunnel_pair.stunnel_missing():
        pytest.fail(missing)
    with Children() as children:
        yield StunnelPair(children, credentials, echo_port, tmp_path / "stunnel")


def test_carries_a_connection_to_the_target(pair: StunnelPair, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 512
    with socket.create_connection(("127.0.0.1", pair.port), timeout=10) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := client.recv(65536):
            received += chunk
    assert received == payload
    assert "Certificate accepted at depth=0: CN=iscl-bench client" in (tmp_path / "stunnel" / "server.log").read_text()
    processes = list(pair.processes)
    pair.stop()
    assert all(process.poll() is not None for process in processes)


def _tls_client(credentials: Credentials, port: int, *, maximum: ssl.TLSVersion, certificate: bool) -> str:
    """Handshake with the server stunnel; the protocol version it agreed to."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.maximum_version = maximum
    context.load_verify_locations(credentials.ca)
    if certificate:
        context.load_cert_chain(credentials.client_cert, credentials.client_key)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"ping")  # TLS 1.3: the server checks the client's certificate after the client's Finished
        assert tls.recv(4) == b"ping"
        return str(tls.version())


def test_the_server_end_takes_tls13_with_a_client_certificate_only(pair: StunnelPair, credentials: Credentials
                                                                   ) -> None:
    assert _tls_client(credentials, pair.server_port, maximum=ssl.TLSVersion.TLSv1_3, certificate=True) == "TLSv1.3"
    with pytest.raises(ssl.SSLError):
        _tls_client(credentials, pair.server_port, maximum=ssl.TLSVersion.TLSv1_2, certificate=True)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _tls_client(credentials, pair.server_port, maximum=ssl.TLSVersion.TLSv1_3, certificate=False)


def test_a_stunnel_that_cannot_start_says_why(credentials: Credentials, echo_port: int, tmp_path: Path) -> None:
    broken = Credentials(credentials.ca, tmp_path / "no-such.key", credentials.server_cert, credentials.client_key,
                         credentials.client_cert)
    with Children() as children, pytest.raises(RuntimeError, match=r"(?s)server\.conf ended \(1\):.*no-such\.key: No such file"):
        StunnelPair(children, broken, echo_port, tmp_path / "stunnel")


def test_a_missing_stunnel4_is_named(credentials: Credentials, echo_port: int, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stunnel_pair, "STUNNEL", "stunnel4-not-installed")
    assert stunnel_pair.stunnel_missing() == "stunnel4 is not installed (apt-get install stunnel4)"
    with Children() as children, pytest.raises(FileNotFoundError, match=r"apt-get install stunnel4"):
        StunnelPair(children, credentials, echo_port, tmp_path / "stunnel")
