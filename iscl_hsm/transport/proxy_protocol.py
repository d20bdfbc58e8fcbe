"""The PROXY protocol header a load balancer puts in front of a connection it relays (HAProxy's
``send-proxy-v2``, version 2, binary; ``send-proxy``, version 1, text), so that the server learns
who the real client is rather than the load balancer's own address.

Parsing is sans-I/O (:func:`missing` says how many more bytes a header needs, :func:`parse` decodes
a complete one), following HAProxy's doc/proxy-protocol.txt; :func:`read_header` reads exactly one
header from an asyncio stream, leaving what follows it (the ISCL handshake) in the stream.

A receiver must never guess whether a header is there (a client could pose as anyone): a tunnel
either expects it on every connection (``--proxy-protocol``) or on none.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from dataclasses import dataclass

from .common import Address

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
"""The 12 bytes that start a version 2 header."""
V1_PREFIX = b"PROXY "
V2_FIXED = 16
"""Signature, version and command, family and transport, length of the rest."""
V2_MAX_REST = 4096
"""Most bytes of addresses and TLVs accepted after the fixed part: far more than any proxy sends
(HAProxy: 12 or 36 bytes of addresses, and a few optional TLVs of tens of bytes)."""
V1_MIN = len(b"PROXY UNKNOWN\r\n")
V1_MAX = 107
"""The longest version 1 line, CRLF included (the spec's worst case)."""

_LOCAL, _PROXY = 0x0, 0x1
_STREAM = 0x1
_ADDRESSES = {0x1: (ipaddress.IPv4Address, 4), 0x2: (ipaddress.IPv6Address, 16)}
"""Address family -> address class and size, for the families whose addresses are decoded (TCP over IPv4/IPv6)."""
_FAMILIES = {0x0, 0x1, 0x2, 0x3}  # UNSPEC, INET, INET6, UNIX
_TRANSPORTS = {0x0, 0x1, 0x2}  # UNSPEC, STREAM, DGRAM
_V1_FAMILIES = {b"TCP4": ipaddress.IPv4Address, b"TCP6": ipaddress.IPv6Address}


class ProxyProtocolError(ValueError):
    """A connection that does not start with a valid PROXY protocol header.

    Its text is a clause that follows the connection's name ("the connection from HOST:PORT" + " " +
    text), e.g. "did not start with a PROXY protocol header (it starts with 01)".
    """


@dataclass(frozen=True)
class ProxyHeader:
    """What a header says about the connection it precedes."""

    local: bool
    """LOCAL (version 2): the proxy's own connection, not a relayed one (HAProxy's health checks)."""
    source: Address | None
    """The real client; None when the header does not name one (LOCAL, UNSPEC, UNKNOWN, UNIX or UDP):
    the connection's own peer is the one to name."""
    destination: Address | None
    """The address the client connected to (the proxy's), when the header names it."""


def missing(data: bytes) -> int:
    """How many more bytes the header that ``data`` starts needs; 0 when it is complete.

    Never more than the header still lacks, so a reader that reads exactly this many bytes takes
    nothing that follows the header. Raises ProxyProtocolError as soon as ``data`` cannot start one.
    """
    if not data:
        return 1  # (the first byte tells the two versions apart)
    if SIGNATURE.startswith(data[: len(SIGNATURE)]):
        if len(data) < V2_FIXED:
            return V2_FIXED - len(data)
        return max(0, V2_FIXED + _v2_rest(data) - len(data))
    if V1_PREFIX.startswith(data[: len(V1_PREFIX)]):
        if data.endswith(b"\r\n"):
            return 0
        if len(data) >= V1_MAX:
            raise ProxyProtocolError(f"sent a PROXY protocol v1 line with no CRLF within its first {V1_MAX} bytes")
        return max(1, V1_MIN - len(data))
    raise ProxyProtocolError(f"did not start with a PROXY protocol header (it starts with {data[:8].hex(' ')})")


def parse(data: bytes) -> ProxyHeader:
    """The header that is exactly ``data`` (complete: :func:`missing` says 0)."""
    if need := missing(data):
        raise ProxyProtocolError(f"sent a truncated PROXY protocol header ({len(data)} bytes, {need} more needed)")
    if not data.startswith(SIGNATURE):
        return _parse_v1(data)
    if len(data) != V2_FIXED + _v2_rest(data):
        raise ProxyProtocolError(f"sent {len(data) - V2_FIXED - _v2_rest(data)} bytes after its PROXY protocol header")
    return _parse_v2(data)


async def read_header(reader: asyncio.StreamReader, timeout: float | None) -> ProxyHeader:
    """Read exactly one header from ``reader`` within ``timeout`` seconds (None: no limit)."""
    data = b""
    try:
        async with asyncio.timeout(timeout):
            while need := missing(data):
                data += await reader.readexactly(need)
    except TimeoutError:
        raise ProxyProtocolError(f"sent no complete PROXY protocol header within {timeout:g} s") from None
    except asyncio.IncompleteReadError as exc:
        data += exc.partial
        got = f"after {len(data)} bytes of its PROXY protocol header" if data else "without sending a PROXY protocol header"
        raise ProxyProtocolError(f"closed {got}") from None
    except OSError as exc:
        raise ProxyProtocolError(f"failed before its PROXY protocol header was complete: {exc.strerror or exc}") from None
    return parse(data)


# --- the two versions ----------------------------------------------------------------------------


def _v2_rest(data: bytes) -> int:
    """The length of what follows the fixed part of a v2 header, once its first 16 bytes are checked."""
    version, command = data[12] >> 4, data[12] & 0xF
    family, transport = data[13] >> 4, data[13] & 0xF
    length = int.from_bytes(data[14:16], "big")
    if version != 2:
        raise ProxyProtocolError(f"sent a PROXY protocol v2 signature with version {version} (only 2 exists)")
    if command not in (_LOCAL, _PROXY):
        raise ProxyProtocolError(f"sent a PROXY protocol v2 header with the unassigned command {command:#x}")
    if family not in _FAMILIES or transport not in _TRANSPORTS:
        raise ProxyProtocolError(
            f"sent a PROXY protocol v2 header with the unassigned family and transport {data[13]:#04x}"
        )
    if length > V2_MAX_REST:
        raise ProxyProtocolError(
            f"sent a PROXY protocol v2 header announcing {length} bytes of addresses and TLVs, more than"
            f" the {V2_MAX_REST} accepted"
        )
    if command == _PROXY and transport == _STREAM and family in _ADDRESSES:
        needed = 2 * _ADDRESSES[family][1] + 4
        if length < needed:
            raise ProxyProtocolError(
                f"sent a PROXY protocol v2 header with {length} bytes of addresses, fewer than the {needed}"
                f" of TCP over IPv{4 if family == 1 else 6}"
            )
    return length


def _parse_v2(data: bytes) -> ProxyHeader:
    """Addresses of TCP over IPv4 or IPv6; the rest (TLVs, other families) is skipped."""
    command, family, transport = data[12] & 0xF, data[13] >> 4, data[13] & 0xF
    if command == _LOCAL:
        return ProxyHeader(local=True, source=None, destination=None)
    if transport != _STREAM or family not in _ADDRESSES:
        return ProxyHeader(local=False, source=None, destination=None)
    kind, size = _ADDRESSES[family]
    source, destination = kind(data[16 : 16 + size]), kind(data[16 + size : 16 + 2 * size])
    source_port, destination_port = struct.unpack_from(">HH", data, 16 + 2 * size)
    return ProxyHeader(False, Address(str(source), source_port), Address(str(destination), destination_port))


def _parse_v1(data: bytes) -> ProxyHeader:
    """``PROXY TCP4|TCP6 SOURCE DESTINATION SOURCE-PORT DESTINATION-PORT\\r\\n`` or ``PROXY UNKNOWN ...``."""
    line = data[:-2]
    fields = line.split(b" ")
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        return ProxyHeader(local=False, source=None, destination=None)
    try:
        _, family, source, destination, source_port, destination_port = fields
        kind = _V1_FAMILIES[family]
        addresses = [kind(text.decode("ascii")) for text in (source, destination)]
        ports = [_v1_port(text) for text in (source_port, destination_port)]
    except (ValueError, KeyError, UnicodeDecodeError):
        shown = line.decode("ascii", "backslashreplace")
        raise ProxyProtocolError(f"sent a malformed PROXY protocol v1 line {shown!r}") from None
    return ProxyHeader(False, Address(str(addresses[0]), ports[0]), Address(str(addresses[1]), ports[1]))


def _v1_port(text: bytes) -> int:
    """A decimal port 0..65535 without leading zeros, as v1 requires."""
    if not text.isdigit() or (len(text) > 1 and text.startswith(b"0")) or int(text) > 65535:
        raise ValueError(text)
    return int(text)


__all__ = ["ProxyHeader", "ProxyProtocolError", "missing", "parse", "read_header"]
