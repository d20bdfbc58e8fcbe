"""The PROXY protocol parser, with headers built from the layout of HAProxy's doc/proxy-protocol.txt
and two captured from HAProxy itself (tests/proxy_headers.py); and the admission rules (--allow-from)
that use it."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iscl_hsm.transport.admission import Admission, BadProxyHeader, NotAllowed, parse_network
from iscl_hsm.transport.common import Address
from iscl_hsm.transport.proxy_protocol import (
    SIGNATURE,
    V1_MAX,
    V2_MAX_REST,
    ProxyHeader,
    ProxyProtocolError,
    missing,
    parse,
    read_header,
)
from tests.proxy_headers import (
    HAPROXY_LOCAL,
    HAPROXY_PROXY,
    LOCAL,
    PROXY,
    TCP4,
    TCP6,
    UDP4,
    UNIX_STREAM,
    UNSPEC,
    relayed,
    tcp4,
    tcp6,
    tlv,
    v2,
)


def read_in_steps(stream: bytes) -> bytes:
    """What a reader that reads exactly ``missing()`` bytes at a time takes from ``stream`` (all of it
    if the stream ends first)."""
    data = b""
    while (need := missing(data)) and len(data) < len(stream):
        data += stream[len(data) : len(data) + need]
    return data


VALID = [
    pytest.param(HAPROXY_PROXY, ProxyHeader(False, Address("127.0.0.1", 49488), Address("127.0.0.1", 58743)),
                 id="haproxy-proxy"),
    pytest.param(HAPROXY_LOCAL, ProxyHeader(True, None, None), id="haproxy-local"),
    pytest.param(v2(PROXY, TCP4, tcp4("192.0.2.7", "198.51.100.1", (4242, 2761))),
                 ProxyHeader(False, Address("192.0.2.7", 4242), Address("198.51.100.1", 2761)), id="tcp4"),
    pytest.param(v2(PROXY, TCP6, tcp6("2001:db8::7", "2001:db8::1", (65535, 2761))),
                 ProxyHeader(False, Address("2001:db8::7", 65535), Address("2001:db8::1", 2761)), id="tcp6"),
    pytest.param(v2(PROXY, TCP4, tcp4("192.0.2.7", "198.51.100.1", (1, 2)) + tlv(0x04, b"\0" * 3)
                    + tlv(0x05, b"id-1234") + tlv(0x20, bytes(5))),
                 ProxyHeader(False, Address("192.0.2.7", 1), Address("198.51.100.1", 2)), id="tcp4-with-tlvs"),
    pytest.param(v2(LOCAL, TCP4, tcp4("10.0.0.1", "10.0.0.2", (1, 2))), ProxyHeader(True, None, None),
                 id="local-with-addresses-skipped"),
    pytest.param(v2(PROXY, UNSPEC, b""), ProxyHeader(False, None, None), id="proxy-unspec"),
    pytest.param(v2(PROXY, UDP4, tcp4("192.0.2.7", "198.51.100.1", (1, 2))), ProxyHeader(False, None, None),
                 id="udp-not-decoded"),
    pytest.param(v2(PROXY, UNIX_STREAM, bytes(216)), ProxyHeader(False, None, None), id="unix-not-decoded"),
    pytest.param(b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n",
                 ProxyHeader(False, Address("192.0.2.7", 56324), Address("198.51.100.1", 443)), id="v1-tcp4"),
    pytest.param(b"PROXY TCP6 2001:db8::7 ::1 0 65535\r\n",
                 ProxyHeader(False, Address("2001:db8::7", 0), Address("::1", 65535)), id="v1-tcp6"),
    pytest.param(b"PROXY UNKNOWN\r\n", ProxyHeader(False, None, None), id="v1-unknown-short"),
    pytest.param(b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
                 b" 65535 65535\r\n", ProxyHeader(False, None, None), id="v1-unknown-longest"),
]  # fmt: skip


@pytest.mark.parametrize(("header", "expected"), VALID)
def test_a_valid_header_is_read_exactly_and_decoded(header: bytes, expected: ProxyHeader) -> None:
    following = b"\x00\x00\x00\x20 the ISCL handshake"
    assert read_in_steps(header + following) == header  # nothing of what follows is taken
    assert parse(header) == expected


@pytest.mark.parametrize("header", [p.values[0] for p in VALID if p.id in ("haproxy-proxy", "tcp4-with-tlvs", "v1-tcp4")])
def test_every_truncation_wants_more_and_does_not_parse(header: bytes) -> None:
    for length in range(len(header)):
        assert missing(header[:length]) > 0
        with pytest.raises(ProxyProtocolError, match=r"^sent a truncated PROXY protocol header"):
            parse(header[:length])


INVALID = [
    pytest.param(bytes.fromhex("01000000c400010000"), r"^did not start with a PROXY protocol header \(it starts with 01\)$",
                 id="dicom-associate-rq"),
    pytest.param(bytes.fromhex("160301"), r"^did not start with a PROXY protocol header \(it starts with 16\)$", id="tls"),
    pytest.param(SIGNATURE[:7] + b"X", r"\(it starts with 0d 0a 0d 0a 00 0d 0a 58\)$", id="wrong-signature"),
    pytest.param(b"PROXX TCP4", r"\(it starts with 50 52 4f 58 58 20 54 43\)$", id="wrong-v1-prefix"),
    pytest.param(v2(0x11, TCP4, tcp4("192.0.2.7", "198.51.100.1", (1, 2))),
                 r"^sent a PROXY protocol v2 signature with version 1 \(only 2 exists\)$", id="version-1"),
    pytest.param(v2(0x31, TCP4, b""), r"with version 3 ", id="version-3"),
    pytest.param(v2(0x22, TCP4, b""), r"^sent a PROXY protocol v2 header with the unassigned command 0x2$",
                 id="unknown-command"),
    pytest.param(v2(PROXY, 0x41, bytes(12)), r"with the unassigned family and transport 0x41$", id="unknown-family"),
    pytest.param(v2(PROXY, 0x13, bytes(12)), r"with the unassigned family and transport 0x13$", id="unknown-transport"),
    pytest.param(SIGNATURE + struct.pack(">BBH", PROXY, TCP4, V2_MAX_REST + 1),
                 rf"announcing {V2_MAX_REST + 1} bytes of addresses and TLVs, more than the {V2_MAX_REST} accepted$",
                 id="oversized"),
    pytest.param(SIGNATURE + struct.pack(">BBH", PROXY, TCP4, 0xFFFF), r"announcing 65535 bytes", id="largest-length"),
    pytest.param(v2(PROXY, TCP4, bytes(8)), r"with 8 bytes of addresses, fewer than the 12 of TCP over IPv4$",
                 id="tcp4-short-addresses"),
    pytest.param(v2(PROXY, TCP6, bytes(12)), r"fewer than the 36 of TCP over IPv6$", id="tcp6-short-addresses"),
    pytest.param(b"PROXY TCP4 192.0.2.7 198.51.100.1 056324 443\r\n", r"^sent a malformed PROXY protocol v1 line "
                 r"'PROXY TCP4 192.0.2.7 198.51.100.1 056324 443'$", id="v1-leading-zero-port"),
    pytest.param(b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 443\r\n", r"malformed", id="v1-port-too-large"),
    pytest.param(b"PROXY TCP4 2001:db8::7 198.51.100.1 1 443\r\n", r"malformed", id="v1-family-mismatch"),
    pytest.param(b"PROXY TCP4 192.0.2.7 198.51.100.1 443\r\n", r"malformed", id="v1-missing-field"),
    pytest.param(b"PROXY UDP4 192.0.2.7 198.51.100.1 1 443\r\n", r"malformed", id="v1-unknown-protocol"),
    pytest.param(b"PROXY TCP4 192.0.2.7 198.51.100.1 1 443\n" + b" " * V1_MAX,
                 rf"^sent a PROXY protocol v1 line with no CRLF within its first {V1_MAX} bytes$", id="v1-bare-lf"),
]  # fmt: skip


@pytest.mark.parametrize(("stream", "error"), INVALID)
def test_an_invalid_header_is_refused_as_soon_as_it_shows(stream: bytes, error: str) -> None:
    with pytest.raises(ProxyProtocolError, match=error):
        parse(read_in_steps(stream))


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_fail_with_the_one_error(data: bytes) -> None:
    try:
        header = parse(read_in_steps(data))
    except ProxyProtocolError:
        return
    assert isinstance(header, ProxyHeader)


# --- reading from a stream -------------------------------------------------------------------------


def read(stream: bytes, *, eof: bool = True, timeout: float | None = 5.0) -> tuple[ProxyHeader, bytes]:
    """``read_header`` on a reader fed ``stream``; what it returned and what it left in the reader."""

    async def run() -> tuple[ProxyHeader, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(stream)
        if eof:
            reader.feed_eof()
        header = await read_header(reader, timeout)
        return header, await reader.read() if eof else b""

    return asyncio.run(run())


def test_read_header_leaves_what_follows_in_the_stream() -> None:
    header, rest = read(HAPROXY_PROXY + b"after")
    assert header.source == Address("127.0.0.1", 49488)
    assert rest == b"after"


@pytest.mark.parametrize(("stream", "error"), [
    (b"", "closed without sending a PROXY protocol header"),
    (HAPROXY_PROXY[:20], "closed after 20 bytes of its PROXY protocol header"),
    (b"PROXY TCP4 1.2.3.4", "closed after 18 bytes of its PROXY protocol header"),
])  # fmt: skip
def test_read_header_says_when_the_connection_ended_first(stream: bytes, error: str) -> None:
    with pytest.raises(ProxyProtocolError) as raised:
        read(stream)
    assert str(raised.value) == error


def test_read_header_gives_up_after_its_timeout() -> None:
    with pytest.raises(ProxyProtocolError) as raised:
        read(HAPROXY_PROXY[:10], eof=False, timeout=0.05)
    assert str(raised.value) == "sent no complete PROXY protocol header within 0.05 s"


# --- admission ---------------------------------------------------------------------------------------


class FakeWriter:
    """The one thing Admission.peer asks of a writer: its socket's peer."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self._peer = peer

    def get_extra_info(self, name: str) -> object:
        return self._peer if name == "peername" else None


def admit(admission: Admission, stream: bytes, socket_peer: tuple[str, int] = ("127.0.0.2", 5000)) -> Address | None:
    async def run() -> Address | None:
        reader = asyncio.StreamReader()
        reader.feed_data(stream)
        reader.feed_eof()
        return await admission.peer(reader, FakeWriter(socket_peer), 5.0)  # type: ignore[arg-type]

    return asyncio.run(run())


def test_allow_from_matches_networks_and_ipv4_mapped_addresses() -> None:
    rules = Admission(allow_from=(parse_network("10.0.0.0/8"), parse_network("2001:db8::/32"), parse_network("192.0.2.9")))
    assert [rules.allows(host) for host in ("10.1.2.3", "::ffff:10.1.2.3", "2001:db8::5", "192.0.2.9")] == [True] * 4
    assert [rules.allows(host) for host in ("11.0.0.1", "192.0.2.10", "2001:db9::1", "?")] == [False] * 4
    assert Admission().allows("?")  # no rule: everyone


@pytest.mark.parametrize(("text", "error"), [
    ("10.0.0.5/8", "'10.0.0.5/8' is not an address or a network such as 10.0.0.0/8 (10.0.0.5/8 has host bits set)"),
    ("pacs.example.org", "'pacs.example.org' is not an address or a network such as 10.0.0.0/8"),
    ("10.0.0.0/33", "'10.0.0.0/33' is not an address or a network such as 10.0.0.0/8"),
])  # fmt: skip
def test_a_bad_network_says_what_is_expected(text: str, error: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_network(text)
    assert str(raised.value).startswith(error)


def test_without_the_proxy_protocol_the_socket_peer_is_checked() -> None:
    rules = Admission(allow_from=(parse_network("127.0.0.0/8"),))
    assert admit(rules, b"", ("127.0.0.2", 5000)) == Address("127.0.0.2", 5000)
    with pytest.raises(NotAllowed) as raised:
        admit(rules, b"", ("192.0.2.7", 5000))
    assert str(raised.value) == "192.0.2.7 is not in --allow-from (127.0.0.0/8); the connection was dropped"
    assert raised.value.peer == Address("192.0.2.7", 5000)


def test_with_the_proxy_protocol_the_real_client_is_checked_and_named() -> None:
    rules = Admission(allow_from=(parse_network("192.0.2.0/24"),), proxy_protocol=True)
    assert admit(rules, relayed("192.0.2.7", 4242)) == Address("192.0.2.7", 4242)  # (the proxy, 127.0.0.2, is not allowed)
    with pytest.raises(NotAllowed, match=r"^198\.51\.100\.9 is not in --allow-from \(192\.0\.2\.0/24\)"):
        admit(rules, relayed("198.51.100.9", 1))
    assert admit(rules, HAPROXY_LOCAL) is None  # a health check: closed, no error
    assert admit(Admission(proxy_protocol=True), v2(PROXY, UNSPEC, b"")) == Address("127.0.0.2", 5000)


def test_a_missing_header_is_refused_with_what_to_check() -> None:
    with pytest.raises(BadProxyHeader) as raised:
        admit(Admission(proxy_protocol=True), bytes.fromhex("01000000c4"), ("192.0.2.7", 41234))
    assert str(raised.value) == (
        "the connection from 192.0.2.7:41234 did not start with a PROXY protocol header (it starts with 01);"
        " is the load balancer configured with send-proxy-v2 (and check-send-proxy for its health checks),"
        " or should --proxy-protocol be off?"
    )
