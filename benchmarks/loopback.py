"""The loopback servers the handshake and throughput sections share, and the client side of each."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence

from benchmarks.common import SUITES, BenchToken, Children, suite_config
from benchmarks.links import framed_connect, serve_framed, serve_iscl
from benchmarks.tls import Credentials
from iscl_hsm.engine import Config, Profile
from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder
from iscl_hsm.transport.blocking import IsclSocket

MAX_MESSAGE = 64 << 20


def loopback_config(profile: Profile, suite: str) -> Config:
    """A suite's Config here: messages up to 64 MiB, for the message-size sweep."""
    return suite_config(profile, suite, max_message=MAX_MESSAGE)


class LoopbackServers:
    """An ISCL server (one listener per profile and suite), a plain TCP and a TLS 1.3 server, each in
    its own process."""

    def __init__(self, children: Children, token: BenchToken, credentials: Credentials,
                 profiles: Sequence[Profile]) -> None:
        self.profiles = tuple(profiles)
        self._configs = {(p, suite): loopback_config(p, suite) for p in self.profiles for suite in SUITES}
        """Made once, as an application would, like the TLS client's context."""
        self._iscl = {key: socket.create_server(("127.0.0.1", 0)) for key in self._configs}
        self._tcp = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._tls = socket.create_server(("127.0.0.1", 0), backlog=128)
        children.spawn(serve_iscl, [(sock, self._configs[key]) for key, sock in self._iscl.items()],
                       str(token.data_dir), token.label, token.pin)
        children.spawn(serve_framed, self._tcp, None)
        children.spawn(serve_framed, self._tls, credentials)
        self._holder = Pkcs11KeyHolder(token.label, token.pin)
        self._tls_context = credentials.client_context()
        self.tcp().close()  # the servers are up and warm before anything is timed
        self.tls().close()
        for profile, suite in self._iscl:
            self.iscl(profile, suite).close()

    def iscl(self, profile: Profile, suite: str) -> IsclSocket:
        """A new ISCL link (authenticated on return) on SoftHSM2."""
        port = self._iscl[(profile, suite)].getsockname()[1]
        return IsclSocket.connect("127.0.0.1", port, key_holder=self._holder, config=self._configs[(profile, suite)])

    def tcp(self) -> socket.socket:
        return framed_connect(self._tcp.getsockname()[1], None)

    def tls(self) -> socket.socket:
        """A new TLS 1.3 connection, both certificates verified, once the server has finished too."""
        return framed_connect(self._tls.getsockname()[1], self._tls_context)

    def tls_context(self) -> ssl.SSLContext:
        return self._tls_context
