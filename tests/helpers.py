"""Test helpers: an in-memory server/client pair of engine Connections with a frame-level tap.

``ConnectionPair`` wires a server and a client :class:`~iscl_hsm.engine.Connection` back to back
(h11 style). :meth:`ConnectionPair.pump` moves ``data_to_send()`` both ways until both ends are
quiet and returns the events each end got. Every frame in flight goes through
``ConnectionPair.intercept`` (if set), which may change, drop, duplicate or hold it back; every frame
each end sent (before interception) is recorded in ``ConnectionPair.sent``.

A frame is an ISCL message: a 32-byte header of eight big-endian u32 (DataLength at offset 8) and
DataLength payload bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pytest

from iscl_hsm.engine import ChallengeGuard, Config, Connection, Event, LinkReady, Profile, Role
from iscl_hsm.errors import IsclError
from iscl_hsm.keyholder.memory import MemoryKeyHolder
from iscl_hsm.wire import HEADER_SIZE, Encryption, Mac, MessageId

HARDENED_ONLY = pytest.mark.parametrize("profile", [Profile.HARDENED], ids=["hardened"])
"""For a test of a protection only the hardened profile has."""
V100_ONLY = pytest.mark.parametrize("profile", [Profile.V100], ids=["v1.00"])
"""For a test of what only the V1.00 profile does."""


V100_PAYLOAD_SIZES: dict[MessageId, int] = {
    MessageId.LINE_CONNECTION_CHECK_RP: 8,
    MessageId.MUTUAL_AUTH_RQ: 8,
    MessageId.MUTUAL_AUTH_RP: 4,
    MessageId.MUTUAL_AUTH_PASS1_NOTIF: 16,
    MessageId.MUTUAL_AUTH_PASS2_NOTIF: 24,
    MessageId.MUTUAL_AUTH_PASS3_NOTIF: 16,
    MessageId.MUTUAL_AUTH_COMPLETION_NOTIF: 4,
    MessageId.MESSAGE_TRANSMISSION_RQ: 16,
    MessageId.MESSAGE_TRANSMISSION_RP: 8,
    MessageId.RNDNO_FOR_SESSION_KEY_RQ: 12,
    MessageId.RNDNO_FOR_SESSION_KEY_RP: 4,
    MessageId.LINE_DISCONNECTION_RP: 4,
}
"""Payload bytes of the SDK builders' messages in V1.00, without authentication data
(shared/reference/iscl-v1.md, section 7)."""


def data_on_the_wire(profile: Profile, encryption: Encryption, length: int) -> int:
    """Bytes of data blocks for a message of ``length`` bytes (docs/protocol.md, padding)."""
    if encryption is Encryption.NONE:
        return length
    if profile is Profile.V100:
        return length + 8 - length % 8  # PKCS#5: always 1..8 bytes
    return length + -length % 8  # zeros, only up to the next multiple of 8


def first_message_malleable(profile: Profile, encryption: Encryption, mac: Mac) -> bool:
    """V1.00 with DES-CBC and DES-MAC: on a link's first message the MAC (CBC-MAC from a zero IV under
    the data's own key) follows the CBC chain, which starts at zero too, so a change to any but the
    message's last DES block goes unnoticed (docs/security.md). Later messages, and other suites, catch it."""
    return profile is Profile.V100 and (encryption, mac) == (Encryption.DES_CBC, Mac.DES_MAC)


def nak_err_no(profile: Profile, code: int) -> int:
    """A NAK's ErrNo: the error code in hardened, zero in V1.00 (the SDK leaves ErrNo unused)."""
    return code if profile is Profile.HARDENED else 0


def cfg(profile: Profile, **settings: object) -> Config:
    """A Config of ``profile``; V1.00's plain MD5 (encryption none) is allowed, as a test pair needs it."""
    if profile is Profile.V100 and settings.get("encryption") is Encryption.NONE and settings.get("mac") is Mac.MD5:
        settings.setdefault("allow_unkeyed_md5", True)
    return Config(profile=profile, **settings)  # type: ignore[arg-type]

# --- keys -------------------------------------------------------------------------------------


def _key(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()[:8]


AUTH_KEYS: dict[int, bytes] = {i: _key(f"auth-{i}") for i in range(1, 9)}
ENC_KEYS: dict[int, bytes] = {i: _key(f"enc-{i}") for i in range(1, 9)}
OTHER_KEY = _key("somebody else's key")


def make_holder(
    auth: dict[int, bytes] | None = None, enc: dict[int, bytes] | None = None, name: str = "test"
) -> MemoryKeyHolder:
    """A key holder with the shared test keys at every index 1..8 (override per index)."""
    return MemoryKeyHolder(
        AUTH_KEYS if auth is None else auth, ENC_KEYS if enc is None else enc, name=name
    )


def secret_texts(*extra: bytes) -> list[bytes]:
    """Byte strings that must never appear in an error text or a repr."""
    out: list[bytes] = []
    for key in (*AUTH_KEYS.values(), *ENC_KEYS.values(), OTHER_KEY):
        out += [key.hex().encode(), key.hex().upper().encode(), repr(key).encode()]
    for data in extra:
        if len(data) >= 6:
            out += [data, repr(data).encode(), data.hex().encode()]
    return out


def assert_no_secrets(obj: object, *extra: bytes) -> None:
    """Neither str() nor repr() of ``obj`` shows a test key or any of ``extra`` (message data)."""
    for text in (str(obj), repr(obj)):
        raw = text.encode("utf-8", "backslashreplace")
        for secret in secret_texts(*extra):
            assert secret not in raw, f"{type(obj).__name__} text leaks secret material: {text!r}"


# --- frames -----------------------------------------------------------------------------------

_HEADER = struct.Struct(">8I")


@dataclass(frozen=True)
class Frame:
    """One ISCL message as it travels: header and payload bytes."""

    raw: bytes

    @property
    def fields(self) -> tuple[int, ...]:
        return _HEADER.unpack(self.raw[:HEADER_SIZE])

    @property
    def message_id(self) -> int:
        return self.fields[1]

    @property
    def option(self) -> int:
        return self.fields[3]

    @property
    def err_no(self) -> int:
        return self.fields[5]

    @property
    def payload(self) -> bytes:
        return self.raw[HEADER_SIZE:]

    def is_(self, mid: MessageId) -> bool:
        return self.message_id == mid

    def replace(
        self,
        *,
        message_id: int | None = None,
        option: int | None = None,
        err_no: int | None = None,
        payload: bytes | None = None,
        data_length: int | None = None,
    ) -> bytes:
        """The frame with some fields changed; DataLength follows the payload unless given."""
        f = list(self.fields)
        body = self.payload if payload is None else payload
        if message_id is not None:
            f[1] = message_id
        f[2] = len(body) if data_length is None else data_length
        if option is not None:
            f[3] = option
        if err_no is not None:
            f[5] = err_no
        return _HEADER.pack(*f) + body

    def flip_bit(self, offset: int, bit: int = 0) -> bytes:
        """The frame with one bit of its payload inverted (negative offsets count from the end)."""
        body = bytearray(self.payload)
        body[offset] ^= 1 << bit
        return self.replace(payload=bytes(body))

    def __repr__(self) -> str:
        try:
            name = MessageId(self.message_id).name
        except ValueError:
            name = f"0x{self.message_id:08X}"
        return f"<Frame {name} {len(self.payload)}B>"


def everything_to_send(conn: Connection) -> bytes:
    """All that ``conn`` has to send now: :meth:`Connection.data_to_send` until it returns nothing."""
    return b"".join(iter(conn.data_to_send, b""))


def split_frames(data: bytes) -> list[Frame]:
    """Cut a byte stream made of whole ISCL frames into frames."""
    frames = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= HEADER_SIZE, "stream ends inside a header"
        (length,) = struct.unpack_from(">I", data, pos + 8)
        end = pos + HEADER_SIZE + length
        assert end <= len(data), "stream ends inside a payload"
        frames.append(Frame(bytes(data[pos:end])))
        pos = end
    return frames


def frames_of(frames: Iterable[Frame], *mids: MessageId) -> list[Frame]:
    return [f for f in frames if f.message_id in mids]


# --- the pair ---------------------------------------------------------------------------------

Intercept = Callable[[Role, Frame], Iterable[bytes]]
"""(sending role, frame) -> the byte strings to deliver instead: [] drops, [a, a] duplicates."""


@dataclass
class Pumped:
    """What each end got during one :meth:`ConnectionPair.pump`."""

    server: list[Event] = field(default_factory=list)
    client: list[Event] = field(default_factory=list)

    def of(self, role: Role) -> list[Event]:
        return self.server if role is Role.SERVER else self.client


def other(role: Role) -> Role:
    return Role.CLIENT if role is Role.SERVER else Role.SERVER


class ConnectionPair:
    """A server and a client Connection connected back to back through a frame tap."""

    def __init__(
        self,
        server_config: Config | None = None,
        client_config: Config | None = None,
        *,
        server_holder: MemoryKeyHolder | None = None,
        client_holder: MemoryKeyHolder | None = None,
        guard: ChallengeGuard | None = None,
        server: Connection | None = None,
        client: Connection | None = None,
        prepare: bool = False,
        profile: Profile = Profile.V100,
    ) -> None:
        """``prepare=True`` calls each end's prepare() after taking its output, as transports do.

        ``profile`` is the profile of the ends whose Config is not given.
        """
        guard = guard or ChallengeGuard()  # a private guard, so tests do not see each other's challenges
        self.server = server or Connection(
            Role.SERVER, server_holder or make_holder(name="server"), server_config or cfg(profile), guard=guard
        )
        self.client = client or Connection(
            Role.CLIENT, client_holder or make_holder(name="client"), client_config or cfg(profile), guard=guard
        )
        self.intercept: Intercept | None = None
        self.prepare = prepare
        self.sent: list[tuple[Role, Frame]] = []
        self.errors: dict[Role, IsclError] = {}
        self.events: dict[Role, list[Event]] = {Role.SERVER: [], Role.CLIENT: []}

    def conn(self, role: Role) -> Connection:
        return self.server if role is Role.SERVER else self.client

    def sent_by(self, role: Role, *mids: MessageId) -> list[Frame]:
        """Frames ``role`` sent so far (optionally only those with the given message ids)."""
        frames = [f for r, f in self.sent if r is role]
        return frames_of(frames, *mids) if mids else frames

    def handshake(self) -> Pumped:
        """Run line connection and mutual authentication; both ends must report LinkReady."""
        self.server.initiate()
        got = self.pump()
        for role in Role:
            ready = [e for e in got.of(role) if isinstance(e, LinkReady)]
            assert len(ready) == 1, f"{role.value} did not get LinkReady: {got.of(role)}"
        return got

    def step(self, sender: Role, *, raise_errors: bool = True) -> Pumped:
        """Deliver what ``sender`` has to send right now (through the tap) and nothing more."""
        got = Pumped()
        self._move(sender, got, None, raise_errors)
        return got

    def pump(self, *, raise_errors: bool = True, chunk: int | None = None, max_rounds: int = 100_000) -> Pumped:
        """Move bytes both ways until neither end has anything to send.

        Each frame is delivered by its own receive_data call (or in ``chunk``-byte pieces), so the
        events of frames before a failing one are kept. An end that raised is fed nothing more, but
        what it still has to send (a NAK, say) still reaches its peer. With ``raise_errors`` the
        first error is re-raised; otherwise it is kept in :attr:`errors`.
        """
        got = Pumped()
        for _ in range(max_rounds):
            moved = [self._move(sender, got, chunk, raise_errors) for sender in (Role.SERVER, Role.CLIENT)]
            if not any(moved):
                return got
        raise AssertionError("the connections never went quiet")

    def _move(self, sender: Role, got: Pumped, chunk: int | None, raise_errors: bool) -> bool:
        data = self.conn(sender).data_to_send()
        if self.prepare and sender not in self.errors:
            self.conn(sender).prepare()
        for frame in split_frames(data):
            self.sent.append((sender, frame))
            out = [frame.raw] if self.intercept is None else self.intercept(sender, frame)
            for raw in out:
                got.of(other(sender)).extend(self._feed(other(sender), raw, chunk, raise_errors))
        return bool(data)

    def deliver(self, to: Role, data: bytes, *, raise_errors: bool = True) -> list[Event]:
        """Feed raw bytes (b"" = end of stream) straight to one end, bypassing the tap."""
        return self._feed(to, data, None, raise_errors)

    def eof(self, to: Role, *, raise_errors: bool = False) -> list[Event]:
        """The peer of ``to`` closed its socket."""
        return self._feed(to, b"", None, raise_errors)

    def _feed(self, to: Role, data: bytes, chunk: int | None, raise_errors: bool) -> list[Event]:
        if to in self.errors:
            return []
        conn = self.conn(to)
        events: list[Event] = []
        pieces = [data] if not chunk or not data else [data[i : i + chunk] for i in range(0, len(data), chunk)]
        try:
            for piece in pieces:
                events += conn.receive_data(piece)
        except IsclError as exc:
            self.errors[to] = exc
            if raise_errors:
                raise
        finally:
            self.events[to] += events
        return events


def received(events: Iterable[object]) -> list[bytes]:
    """The data of the verified messages among ``events``."""
    from iscl_hsm.engine import MessageReceived

    return [e.data for e in events if isinstance(e, MessageReceived)]


def exchange(p: ConnectionPair, from_client: list[bytes], from_server: list[bytes]) -> None:
    """Queue messages at both ends at once, pump, and check that each arrived whole and in order."""
    for a, b in zip(from_client, from_server, strict=True):
        p.client.send_message(a)
        p.server.send_message(b)
    got = p.pump()
    assert received(got.server) == from_client
    assert received(got.client) == from_server


def reflecting_the_servers_challenge(p: ConnectionPair) -> Intercept:
    """A tap that puts the server's own challenge into the client's PASS2 as the client's challenge."""
    from iscl_hsm import wire

    def reflect(role: Role, f: Frame) -> list[bytes]:
        if role is Role.CLIENT and f.is_(MessageId.MUTUAL_AUTH_PASS2_NOTIF):
            rs = wire.Pass1.decode(p.sent_by(Role.SERVER, MessageId.MUTUAL_AUTH_PASS1_NOTIF)[0].payload).challenge
            p2 = wire.Pass2.decode(f.payload)
            return [f.replace(payload=wire.Pass2(0, p2.response, rs).encode())]
        return [f.raw]

    return reflect
