"""Who may open a link: the peer a tunnel names a connection by, and whether it is allowed in.

Behind a load balancer that speaks the PROXY protocol (``--proxy-protocol``) the peer is the real
client the header names, not the load balancer; ``--allow-from`` then applies to that client. Both
run before anything else happens on a connection: a refused one costs no handshake and no token call.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass

from .common import Address
from .proxy_protocol import ProxyProtocolError, read_header

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

PROXY_HINT = (
    "is the load balancer configured with send-proxy-v2 (and check-send-proxy for its health checks),"
    " or should --proxy-protocol be off?"
)


class Refused(Exception):
    """A connection dropped before its handshake; the text says why and what to check."""

    def __init__(self, peer: Address, message: str) -> None:
        super().__init__(message)
        self.peer = peer


class NotAllowed(Refused):
    """The peer is in none of the --allow-from networks."""


class BadProxyHeader(Refused):
    """With --proxy-protocol, the connection did not start with a valid PROXY protocol header."""


def parse_network(text: str) -> Network:
    """An address or a network in CIDR notation (10.0.0.0/8, 2001:db8::/32); ValueError says what is wrong."""
    try:
        return ipaddress.ip_network(text.strip())
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an address or a network such as 10.0.0.0/8 ({exc})") from None


@dataclass(frozen=True)
class Admission:
    """A tunnel's rules for new connections. The default admits everyone under its socket's address."""

    allow_from: tuple[Network, ...] = ()
    """Networks peers may connect from; empty: everyone."""
    proxy_protocol: bool = False
    """Every connection starts with a PROXY protocol header (v2 or v1) naming the real client."""

    async def peer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float | None
    ) -> Address | None:
        """The peer to name a new connection by, or None for the load balancer's own health check
        (a LOCAL header), which is closed without a word. Raises :class:`Refused`.

        ``timeout`` bounds the wait for the PROXY protocol header.
        """
        peer = Address.of(writer.get_extra_info("peername"))
        if self.proxy_protocol:
            try:
                header = await read_header(reader, timeout)
            except ProxyProtocolError as exc:
                raise BadProxyHeader(peer, f"the connection from {peer} {exc}; {PROXY_HINT}") from None
            if header.local:
                return None
            peer = header.source or peer
        if not self.allows(peer.host):
            allowed = ", ".join(map(str, self.allow_from))
            raise NotAllowed(peer, f"{peer.host} is not in --allow-from ({allowed}); the connection was dropped")
        return peer

    def allows(self, host: str) -> bool:
        """Whether ``host`` (an IP address; IPv4-mapped IPv6 counts as IPv4) is in an allowed network."""
        if not self.allow_from:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False  # ("?": the socket is gone already)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.allow_from)


__all__ = ["Admission", "BadProxyHeader", "Network", "NotAllowed", "Refused", "parse_network"]
