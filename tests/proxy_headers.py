"""PROXY protocol headers for tests: built from the layout of HAProxy's doc/proxy-protocol.txt, and two
captured from HAProxy itself."""

from __future__ import annotations

import ipaddress
import struct

from iscl_hsm.transport.proxy_protocol import SIGNATURE

HAPROXY_PROXY = bytes.fromhex("0d0a0d0a000d0a515549540a2111000c7f0000017f000001c150e577")
"""HAProxy 2.6.12 (Debian 12), ``send-proxy-v2``: a client at 127.0.0.1:49488 relayed from the frontend 127.0.0.1:58743."""
HAPROXY_LOCAL = bytes.fromhex("0d0a0d0a000d0a515549540a20000000")
"""The same HAProxy's health check with ``check-send-proxy``: LOCAL, UNSPEC, no addresses."""

PROXY, LOCAL = 0x21, 0x20
"""Version 2 and the command."""
TCP4, TCP6, UDP4, UNIX_STREAM, UNSPEC = 0x11, 0x21, 0x12, 0x31, 0x00
"""Address family and transport."""


def v2(ver_cmd: int, family: int, rest: bytes) -> bytes:
    """A version 2 header: signature, version/command, family/transport, length, then ``rest``."""
    return SIGNATURE + struct.pack(">BBH", ver_cmd, family, len(rest)) + rest


def tcp4(source: str, destination: str, ports: tuple[int, int]) -> bytes:
    """The address block of TCP over IPv4."""
    return ipaddress.IPv4Address(source).packed + ipaddress.IPv4Address(destination).packed + struct.pack(">HH", *ports)


def tcp6(source: str, destination: str, ports: tuple[int, int]) -> bytes:
    """The address block of TCP over IPv6."""
    return ipaddress.IPv6Address(source).packed + ipaddress.IPv6Address(destination).packed + struct.pack(">HH", *ports)


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack(">BH", kind, len(value)) + value


def relayed(source: str, port: int) -> bytes:
    """What HAProxy's send-proxy-v2 sends before a connection from ``source``:``port`` (to 198.51.100.1:2761)."""
    return v2(PROXY, TCP4, tcp4(source, "198.51.100.1", (port, 2761)))
