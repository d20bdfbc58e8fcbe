"""The loopback servers the handshake and throughput sections share, and the client side of each."""

from __future__ import annotations

import socket
import ssl

from benchmarks.common import BenchToken, Children
from benchmarks.links import framed_connect, serve_framed, serve_iscl
from benchmarks.tls import Credentials
from iscl_hsm.engine import Config
from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder
from iscl_hsm.transport.blocking import IsclSocket
from iscl_hsm.wire import Encryption, Mac

SUITES = {
    "none/none": (Encryption.NONE, Mac.NONE),
    "none/md5": (Encryption.NONE, Mac.MD5),
    "none/des-mac": (Encryption.NONE, Mac.DES_MAC),
    "des-cbc/md5": (Encryption.DES_CBC, Mac.MD5),
    "des-cbc/des-mac": (Encryption.DES_CBC, Mac.DES_MAC),
}
"""ISCL's record protection choices, weakest first ("none/none" shows the framing alone)."""
MAX_MESSAGE = 64 << 20


def suite_config(suite: str) -> Config:
    encryption, mac = SUITES[suite]
    return Config(encryption=encryption, mac=mac, max_message=MAX_MESSAGE)


class LoopbackServers:
    """An ISCL server (one listener per suite), a plain TCP and a TLS 1.3 server, each in its own process."""

    def __init__(self, children: Children, token: BenchToken, credentials: Credentials) -> None:
        self._iscl = {suite: socket.create_server(("127.0.0.1", 0)) for suite in SUITES}
        self._tcp = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._tls = socket.create_server(("127.0.0.1", 0), backlog=128)
        children.spawn(serve_iscl, [(sock, suite_config(s)) for s, sock in self._iscl.items()],
                       str(token.data_dir), token.label, token.pin)
        children.spawn(serve_framed, self._tcp, None)
        children.spawn(serve_framed, self._tls, credentials)
        self._holder = Pkcs11KeyHolder(token.label, token.pin)
        self._tls_context = credentials.client_context()
        self.tcp().close()  # the servers are up and warm before anything is timed
        self.tls().close()
        for suite in SUITES:
            self.iscl(suite).close()

    def iscl(self, suite: str) -> IsclSocket:
        """A new ISCL link (authenticated on return) on SoftHSM2."""
        port = self._iscl[suite].getsockname()[1]
        return IsclSocket.connect("127.0.0.1", port, key_holder=self._holder, config=suite_config(suite))

    def tcp(self) -> socket.socket:
        return framed_connect(self._tcp.getsockname()[1], None)

    def tls(self) -> socket.socket:
        """A new TLS 1.3 connection, both certificates verified, once the server has finished too."""
        return framed_connect(self._tls.getsockname()[1], self._tls_context)

    def tls_context(self) -> ssl.SSLContext:
        return self._tls_context
