"""The ISCL V1.00 protocol engine: one link, either role, no I/O.

Theory of operation
-------------------
A :class:`Connection` is fed the bytes that arrive from the peer (:meth:`receive_data`) and returns
events; the bytes it wants sent are collected by :meth:`data_to_send`. It never touches a socket or a
clock. It calls its :class:`~iscl_hsm.keyholder.base.KeyHolder` for challenges, responses and key
derivation, so a transport runs engine calls off any event loop (see iscl_hsm.transport.aio).

The four ISCL protocols run in this order:

1. line connection   server: LINE_CONNECTION_CHECK_RQ (max block, version)
                     client: LINE_CONNECTION_CHECK_RP (status, min(client, server) block)
2. authentication    client: MUTUAL_AUTH_RQ (method, key-pair id N, client auth data)
                     server: MUTUAL_AUTH_RP (status, server auth data), PASS1 (RS = GET CHALLENGE)
                     client: PASS2 (E_K(RS) = INTERNAL AUTHENTICATE, RC = GET CHALLENGE)
                     server: EXTERNAL AUTHENTICATE of E_K(RS); PASS3 (E_K(RC), server handshake MAC)
                     client: EXTERNAL AUTHENTICATE of E_K(RC), checks the server MAC;
                             COMPLETION (client handshake MAC) -> both ends are ready.
3. message transfer  either end, per message: TRANSMISSION_RQ -> RP (ACK/NAK); [RNDNO_RQ -> RP];
                     NOTIF blocks; MAC_NOTIF. THROUGH_MODE_NOTIF carries unprotected data.
4. disconnection     LINE_DISCONNECTION_RQ -> RP (ACK, or NAK when refused).

Every incoming message is checked against :data:`_EXPECTED` (which message may arrive in which state)
as soon as its header is in, before its payload is buffered, and against a size limit for its kind, so
garbage costs no memory. Anything the peer does wrong raises :class:`RemoteProtocolError` and the link
is dead: send what :meth:`data_to_send` still returns (it may hold a NAK that tells the peer why), then
close the socket.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from enum import Enum, auto

from .. import wire
from ..errors import ErrorCode, IsclError, KeyHolderError, LocalProtocolError, RemoteProtocolError
from ..keyholder.base import KEY_INDEXES, KeyHolder, RecordKey
from ..wire import MessageId
from .config import Config, Role
from .events import (
    Closed,
    CloseRefused,
    Event,
    LinkParameters,
    LinkReady,
    MessageReceived,
    MessageRefused,
    MessageSent,
    NonSecureReceived,
)
from .record import Chain, KeySchedule, MessageKeys, Opener, Sealer, Suite, cbc_mac, finished_block


class State(Enum):
    """Where the link is; ``READY`` is the only state in which messages flow."""

    SERVER_START = auto()
    SERVER_WAIT_LINE_RP = auto()
    SERVER_WAIT_AUTH_RQ = auto()
    SERVER_WAIT_PASS2 = auto()
    SERVER_WAIT_COMPLETION = auto()
    CLIENT_WAIT_LINE_RQ = auto()
    CLIENT_WAIT_AUTH_RP = auto()
    CLIENT_WAIT_PASS1 = auto()
    CLIENT_WAIT_PASS3 = auto()
    READY = auto()
    CLOSING = auto()  # we sent LINE_DISCONNECTION_RQ
    CLOSED = auto()
    ERROR = auto()


_KEY_HOLDER_STATES = frozenset(
    {
        State.SERVER_WAIT_LINE_RP,  # the client sends AUTH_RQ right behind LINE_RP
        State.SERVER_WAIT_AUTH_RQ,  # GET CHALLENGE
        State.SERVER_WAIT_PASS2,  # EXTERNAL and INTERNAL AUTHENTICATE, key derivation
        State.CLIENT_WAIT_AUTH_RP,  # the server sends PASS1 right behind AUTH_RP
        State.CLIENT_WAIT_PASS1,  # INTERNAL AUTHENTICATE, GET CHALLENGE
        State.CLIENT_WAIT_PASS3,  # EXTERNAL AUTHENTICATE, key derivation, the handshake MACs
    }
)
"""Handshake states in which the bytes received next may hold a message that makes key-holder calls
(one read often returns two messages the peer sent together). SERVER_WAIT_COMPLETION is not one of
them once the handshake-MAC key and the record keys are host keys derived ahead (see may_block)."""

_LINK_MESSAGES = frozenset(
    {
        MessageId.MESSAGE_TRANSMISSION_RQ,
        MessageId.MESSAGE_TRANSMISSION_RP,
        MessageId.RNDNO_FOR_SESSION_KEY_RQ,
        MessageId.RNDNO_FOR_SESSION_KEY_RP,
        MessageId.MESSAGE_TRANSMISSION_NOTIF,
        MessageId.MAC_TRANSMISSION_NOTIF,
        MessageId.THROUGH_MODE_TRANSMISSION_NOTIF,
        MessageId.LINE_DISCONNECTION_RQ,
        MessageId.LINE_DISCONNECTION_RP,
    }
)

_EXPECTED: dict[State, frozenset[MessageId]] = {
    State.SERVER_WAIT_LINE_RP: frozenset({MessageId.LINE_CONNECTION_CHECK_RP}),
    State.SERVER_WAIT_AUTH_RQ: frozenset({MessageId.MUTUAL_AUTH_RQ}),
    State.SERVER_WAIT_PASS2: frozenset({MessageId.MUTUAL_AUTH_PASS2_NOTIF}),
    State.SERVER_WAIT_COMPLETION: frozenset({MessageId.MUTUAL_AUTH_COMPLETION_NOTIF}),
    State.CLIENT_WAIT_LINE_RQ: frozenset({MessageId.LINE_CONNECTION_CHECK_RQ}),
    State.CLIENT_WAIT_AUTH_RP: frozenset({MessageId.MUTUAL_AUTH_RP}),
    State.CLIENT_WAIT_PASS1: frozenset({MessageId.MUTUAL_AUTH_PASS1_NOTIF}),
    State.CLIENT_WAIT_PASS3: frozenset({MessageId.MUTUAL_AUTH_PASS3_NOTIF}),
    State.READY: _LINK_MESSAGES,
    State.CLOSING: _LINK_MESSAGES,
}
"""The transition table: which message may arrive in which state. Anything else kills the link."""

_HANDSHAKE_LIMIT = 16 + 3 * 4 + wire.MAX_AUTH_DATA
"""No handshake or control payload is longer than this; larger lengths are refused unread."""


class ChallengeGuard:
    """Challenges this process issued and still awaits answers to, per role (reflection defence).

    A client refuses a server challenge equal to one of its own outstanding challenges, so a fake
    server cannot make one of our clients answer another of our clients' challenges.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outstanding: dict[Role, set[bytes]] = {Role.CLIENT: set(), Role.SERVER: set()}

    def issue(self, role: Role, challenge: bytes) -> None:
        with self._lock:
            self._outstanding[role].add(challenge)

    def release(self, role: Role, challenge: bytes) -> None:
        with self._lock:
            self._outstanding[role].discard(challenge)

    def is_ours(self, role: Role, challenge: bytes) -> bool:
        with self._lock:
            return challenge in self._outstanding[role]


DEFAULT_GUARD = ChallengeGuard()

_OUTBOUND_BATCH = 8
"""Data blocks sealed per :meth:`Connection.data_to_send` call (64 KiB at the largest block length):
few enough that the receiver starts deciphering while the sender still enciphers, enough to keep the
per-call work (Python, one send) small. Against 4: with no protection both ends of a loopback link
spent a fifth less CPU per MiB, with MD5 alone the rate rose 5-14%, and with DES the difference was
within this machine's noise; against 16, the receiver waited longer for each batch and DES-CBC + MD5
lost 8% (docs/performance.md)."""

_BLOCK_HEAD = struct.Struct(">4xIII")
"""MessageId, DataLength and Option of a header, for the data-block fast path."""

_SEAL_AHEAD_BYTES = 32 * 1024
"""How much of a requested message :meth:`Connection.prepare` seals before the peer accepts it (see
:meth:`Connection.seal_ahead`). Enough to cover the acceptance's round trip; more, sealed in one go,
would make the receiver wait that much longer for the first block whenever it was idle (as it is at
the start of every DICOM object)."""

_SEAL_AHEAD_STEP = 16 * 1024
"""What each further :meth:`Connection.seal_ahead` call seals: little, so that a transport calling it
until the acceptance arrives sends the sealed blocks soon after."""

_SEAL_AHEAD_LIMIT = 256 * 1024
"""The most of one message :meth:`Connection.seal_ahead` seals before the peer accepts it: bounds the
memory held by sealed frames that may yet be dropped (when the peer refuses)."""

_DECIPHER_BATCH = 4 * 8 * 1024
"""Received ciphertext deciphered in one call once this much has accumulated."""


class Connection:
    """One ISCL link (h11-style: bytes in, events and bytes out)."""

    def __init__(
        self,
        role: Role,
        key_holder: KeyHolder,
        config: Config | None = None,
        *,
        guard: ChallengeGuard = DEFAULT_GUARD,
        random: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.role = role
        self.config = config or Config()
        self._holder = key_holder
        self._guard = guard
        self._random = random
        self._state = State.SERVER_START if role is Role.SERVER else State.CLIENT_WAIT_LINE_RQ
        self._inbuf = bytearray()
        self._out: list[bytes] = []  # frames for the peer, joined by data_to_send()
        self._transcript = hashlib.md5()
        self._before_last = self._transcript  # the transcript before the last message received
        self._block_length = 0
        self._pair_id = self.config.auth_key_id
        self._peer_auth_data = b""
        self._rs = b""
        self._rc = b""
        self._schedule: KeySchedule | None = None
        self._deferred: Callable[[], object] | None = None  # see prepare()
        self._fin_key: RecordKey | None = None
        self.parameters: LinkParameters | None = None
        # Message transfer, one state per direction.
        self._send_chain = Chain()
        self._recv_chain = Chain()
        self._queue: deque[bytes] = deque()
        self._pending: bytes | None = None  # sent RQ, waiting for RP (and RNDNO_RP)
        self._pending_random: bytes | None = None
        self._sealer: Sealer | None = None
        self._sealed_ahead: tuple[Sealer, list[bytes]] | None = None  # the pending message's start, see seal_ahead()
        self._sealed_out = False  # _out holds blocks sealed ahead, just accepted
        self._close_wanted = False
        self._incoming: Suite | None = None  # accepted RQ, waiting for RNDNO_RQ
        self._incoming_length = 0
        self._opener: Opener | None = None
        #: The last message request the peer made that we refused (GetPeer...ISCL in the SDK).
        self.peer_request: wire.TransmissionRq | None = None

    # --- public API ---------------------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        self._config = config
        self._outbound_suite = Suite(config.encryption, config.enc_key_id, config.mac)  # what our messages use

    @property
    def state(self) -> State:
        return self._state

    @property
    def block_length(self) -> int:
        """The negotiated communication block length (0 before line connection)."""
        return self._block_length

    def initiate(self) -> None:
        """Server only: start the line connection protocol."""
        if self._state is not State.SERVER_START:
            raise LocalProtocolError(ErrorCode.BAD_STATE, "initiate() is for a new server connection")
        self._send(
            MessageId.LINE_CONNECTION_CHECK_RQ, wire.LineConnectionRq(self.config.max_block).encode()
        )
        self._state = State.SERVER_WAIT_LINE_RP

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer (``b""`` at end of stream); return what happened."""
        if self._state is State.ERROR:
            raise LocalProtocolError(ErrorCode.BAD_STATE, "the link has already failed")
        if not data:
            return self._end_of_stream()
        self._inbuf += data
        events: list[Event] = []
        try:
            while True:
                if self._opener is not None and not self._opener.complete:
                    self._take_blocks(self._opener)
                message = self._next_message()
                if message is None:
                    return events
                header, payload = message
                events.extend(self._dispatch(header, payload))
                if self._opener is not None and self._opener.backlog >= _DECIPHER_BATCH:
                    self._opener.process()
        except IsclError as exc:
            self._fail()
            exc.events = events  # what happened before the failure, e.g. messages already verified
            raise

    def data_to_send(self) -> bytes:
        """Bytes for the peer: control messages first, then the next blocks of an outgoing message.

        Blocks sealed ahead of the peer's acceptance go out on their own, without a further batch
        sealed first: the peer is waiting for them.
        """
        if self._sealed_out:
            self._sealed_out = False
        elif self._sealer is not None and self._state is not State.ERROR:
            self._out.append(self._sealer.next_frames(_OUTBOUND_BATCH))
            if self._sealer.done:
                self._sealer = None
                self._start_next_message()
        out = b"".join(self._out)
        self._out.clear()
        return out

    def send_message(self, data: bytes) -> None:
        """Queue a secured message; it goes out when the peer accepts its request."""
        self._require_ready("send a message")
        if len(data) > self.config.max_message:
            raise LocalProtocolError(
                ErrorCode.LOCAL_LENGTH_TOO_SMALL,
                f"a message of {len(data)} bytes exceeds the local maximum of"
                f" {self.config.max_message}; raise --max-message or split the data",
            )
        self._queue.append(bytes(data))
        if self._pending is None and self._sealer is None:
            self._start_next_message()

    def send_non_secure(self, data: bytes) -> None:
        """Send unprotected data in through mode (the peer must have enabled it too)."""
        self._require_ready("send a non-secure message")
        if not self.config.through_mode:
            raise LocalProtocolError(
                ErrorCode.THROUGH_MODE_DISABLED, "through mode is off; enable it in Config to send"
            )
        if len(data) > self.config.max_message:
            raise LocalProtocolError(
                ErrorCode.LOCAL_LENGTH_TOO_SMALL,
                f"a message of {len(data)} bytes exceeds the local maximum of {self.config.max_message}",
            )
        self._send(MessageId.THROUGH_MODE_TRANSMISSION_NOTIF, data)

    def close(self) -> None:
        """Start line disconnection once every queued message has gone out."""
        self._require_ready("close the line")
        self._close_wanted = True
        self._maybe_send_close()

    def prepare(self) -> None:
        """Do work that can wait until the output is on its way: key derivation ahead of need.

        Transports call this after sending :meth:`data_to_send`, before waiting for the peer, so a
        key holder's slow derivation (and the sealing of a requested message) overlaps with the
        peer's own work. Never required: whatever it does would otherwise happen when first needed,
        so a key holder's failure here is left for that moment, where the engine tells the peer why
        (NAK 103) before the link drops.
        """
        work, self._deferred = self._deferred, None
        if self._state is State.ERROR:
            return
        if work is not None:
            with suppress(KeyHolderError):
                work()
        if self._sealed_ahead is None:
            self.seal_ahead()

    @property
    def may_block(self) -> bool:
        """True when the next call may wait on the key holder; a transport then makes it off its loop.

        Once the link is up, only unique session keys, record keys kept in a token or card, and keys
        not derived yet (``prepare()`` derives them) need the key holder.
        """
        if self._deferred is not None or self._state in _KEY_HOLDER_STATES:
            return True
        if self._state is State.SERVER_WAIT_COMPLETION:
            return not self._derived_on_host()
        if self._state not in (State.READY, State.CLOSING):
            return False
        suite = self._outbound_suite
        if not suite.needs_keys:
            return False
        assert self._schedule is not None
        return not (self._holder.host_record_keys and self._schedule.derived(suite))

    def _derived_on_host(self) -> bool:
        """True when the handshake-MAC key and the record keys are derived and kept in this process.

        The server's prepare() derives them while the client checks pass 3, so checking the client's
        COMPLETION is then host DES only, not worth a thread hand-off in an asyncio transport.
        """
        assert self._schedule is not None
        return (
            self._fin_key is not None
            and self._holder.host_record_keys
            and not self._schedule.link_blocks(self._outbound_suite)
        )

    @property
    def idle(self) -> bool:
        """True when nothing is queued, in flight or half received."""
        return not (
            self._queue or self._pending is not None or self._sealer or self._incoming or self._opener
        )

    def _fail(self) -> None:
        """The link is dead: forget the challenge we issued, so the guard does not grow without bound."""
        self._state = State.ERROR
        if self._rs and self.role is Role.SERVER:
            self._guard.release(Role.SERVER, self._rs)
        if self._rc and self.role is Role.CLIENT:
            self._guard.release(Role.CLIENT, self._rc)

    # --- framing ------------------------------------------------------------------------------

    def _next_message(self) -> tuple[wire.Header, bytes] | None:
        if len(self._inbuf) < wire.HEADER_SIZE:
            return None
        header = wire.Header.decode(memoryview(self._inbuf)[: wire.HEADER_SIZE])
        mid = self._check_header(header)
        end = wire.HEADER_SIZE + header.data_length
        if len(self._inbuf) < end:
            return None
        with memoryview(self._inbuf) as view:
            payload = bytes(view[wire.HEADER_SIZE : end])
            if mid not in _LINK_MESSAGES:
                self._before_last = self._transcript.copy()
                self._transcript.update(view[:end])
        del self._inbuf[:end]
        return wire.Header(mid, header.data_length, header.option, header.err_no), payload

    def _take_blocks(self, opener: Opener) -> None:
        """Fast path for the bulk of all traffic: consecutive data blocks of an accepted message.

        Only well-formed MESSAGE_TRANSMISSION_NOTIFs are taken here, without building Header
        objects; anything else is left to _next_message and its full checks.
        """
        buf, pos, limit = self._inbuf, 0, self._block_length
        with memoryview(buf) as view:
            while len(buf) - pos >= wire.HEADER_SIZE and not opener.complete:
                mid, length, option = _BLOCK_HEAD.unpack_from(buf, pos)
                end = pos + wire.HEADER_SIZE + length
                if mid != MessageId.MESSAGE_TRANSMISSION_NOTIF or option != wire.ACK or length > limit:
                    break
                if len(buf) < end:
                    break
                opener.add_block(view[pos + wire.HEADER_SIZE : end])
                pos = end
            opener.process()  # copies out of the views before the buffer moves
        del buf[:pos]

    def _check_header(self, header: wire.Header) -> MessageId:
        try:
            mid = MessageId(header.message_id)
        except ValueError:
            raise RemoteProtocolError(
                ErrorCode.BAD_MESSAGE_ID,
                f"the peer sent unknown message id 0x{header.message_id:08X}; is it an ISCL peer?",
            ) from None
        if mid not in _EXPECTED.get(self._state, frozenset()):
            raise RemoteProtocolError(
                ErrorCode.BAD_MESSAGE_ID,
                f"the peer sent {mid.name} while this end was in state {self._state.name}",
            )
        if header.option not in (wire.ACK, wire.NAK):
            raise RemoteProtocolError(
                ErrorCode.BAD_OPTION, f"the peer sent option 0x{header.option:08X} in {mid.name}"
            )
        if mid is MessageId.THROUGH_MODE_TRANSMISSION_NOTIF and not self.config.through_mode:
            raise RemoteProtocolError(
                ErrorCode.THROUGH_MODE_DISABLED,
                "the peer sent unprotected (through-mode) data, which this end does not accept",
            )
        limit = self._payload_limit(mid)
        if header.data_length > limit:
            raise RemoteProtocolError(
                ErrorCode.BAD_LENGTH,
                f"the peer announced {header.data_length} bytes of {mid.name}; at most {limit} are allowed",
            )
        return mid

    def _payload_limit(self, mid: MessageId) -> int:
        if mid is MessageId.MESSAGE_TRANSMISSION_NOTIF:
            return self._block_length
        if mid is MessageId.THROUGH_MODE_TRANSMISSION_NOTIF:
            return self.config.max_message
        return _HANDSHAKE_LIMIT

    def _dispatch(self, header: wire.Header, payload: bytes) -> list[Event]:
        handler = _HANDLERS[header.message_id]
        return handler(self, header, payload)

    def _send(self, mid: MessageId, payload: bytes, *, option: int = wire.ACK, err: int = 0) -> None:
        """Queue a message; handshake messages also go into the transcript the finished MACs cover."""
        frame = wire.frame(mid, payload, option=option, err_no=err)
        if mid not in _LINK_MESSAGES:
            self._transcript.update(frame)
        self._out.append(frame)

    # --- line connection ----------------------------------------------------------------------

    def _on_line_rq(self, header: wire.Header, payload: bytes) -> list[Event]:
        rq = wire.LineConnectionRq.decode(payload)
        if rq.version != wire.VERSION:
            self._send(
                MessageId.LINE_CONNECTION_CHECK_RP,
                wire.LineConnectionRp(ErrorCode.BAD_VERSION, 0).encode(),
                option=wire.NAK,
                err=ErrorCode.BAD_VERSION,
            )
            raise RemoteProtocolError(
                ErrorCode.BAD_VERSION,
                f"the server speaks {rq.version!r}, not {wire.VERSION.decode()}",
            )
        block = min(self.config.max_block, rq.max_block) // 8 * 8
        if block < wire.MIN_BLOCK:
            raise RemoteProtocolError(
                ErrorCode.BAD_BLOCK_LENGTH, f"the server offered a block length of {rq.max_block} bytes"
            )
        self._block_length = block
        self._send(MessageId.LINE_CONNECTION_CHECK_RP, wire.LineConnectionRp(0, block).encode())
        self._send(
            MessageId.MUTUAL_AUTH_RQ,
            wire.MutualAuthRq(
                wire.AuthMethod.THREE_PASS_FOUR_WAY, self._pair_id, self.config.auth_data
            ).encode(),
        )
        self._state = State.CLIENT_WAIT_AUTH_RP
        return []

    def _on_line_rp(self, header: wire.Header, payload: bytes) -> list[Event]:
        rp = wire.LineConnectionRp.decode(payload)
        self._check_ack(header, rp.status, "line connection")
        if not (wire.MIN_BLOCK <= rp.block_length <= self.config.max_block and rp.block_length % 8 == 0):
            raise RemoteProtocolError(
                ErrorCode.BAD_BLOCK_LENGTH,
                f"the client chose a block length of {rp.block_length} bytes; this server allows a"
                f" multiple of 8 between {wire.MIN_BLOCK} and {self.config.max_block}",
            )
        self._block_length = rp.block_length
        self._state = State.SERVER_WAIT_AUTH_RQ
        return []

    # --- mutual authentication ----------------------------------------------------------------

    def _on_auth_rq(self, header: wire.Header, payload: bytes) -> list[Event]:
        rq = wire.MutualAuthRq.decode(payload)
        if rq.method != wire.AuthMethod.THREE_PASS_FOUR_WAY:
            self._refuse_auth(ErrorCode.BAD_AUTH_METHOD, f"the client asked for authentication method {rq.method}")
        if rq.key_id not in KEY_INDEXES or rq.key_id not in self.config.allowed_auth_key_ids:
            self._refuse_auth(
                ErrorCode.BAD_OPTION, f"the client asked for authentication key {rq.key_id}, which this server does not allow"
            )
        if not 1 <= len(rq.auth_data) <= wire.MAX_AUTH_DATA:
            self._refuse_auth(ErrorCode.BAD_LENGTH, f"the client sent {len(rq.auth_data)} bytes of authentication data")
        self._pair_id = rq.key_id
        self._peer_auth_data = rq.auth_data
        failed = wire.MutualAuthRp(ErrorCode.REMOTE_KEY_HOLDER, b"")
        with self._telling_peer(MessageId.MUTUAL_AUTH_RP, failed.encode()):
            self._rs = self._holder.get_challenge(self._pair_id)
        self._guard.issue(Role.SERVER, self._rs)
        self._send(MessageId.MUTUAL_AUTH_RP, wire.MutualAuthRp(0, self.config.auth_data).encode())
        self._send(MessageId.MUTUAL_AUTH_PASS1_NOTIF, wire.Pass1(0, self._rs).encode())
        self._deferred = self._finished_key  # while the client works on pass 1
        self._state = State.SERVER_WAIT_PASS2
        return []

    @contextmanager
    def _telling_peer(self, mid: MessageId, nak_payload: bytes) -> Iterator[None]:
        """If the key holder fails inside, answer ``mid`` as NAK with code 103, then let the error go on."""
        try:
            yield
        except KeyHolderError:
            code = ErrorCode.REMOTE_KEY_HOLDER
            self._send(mid, nak_payload, option=wire.NAK, err=code)
            raise

    def _refuse_auth(self, code: ErrorCode, why: str) -> None:
        self._send(
            MessageId.MUTUAL_AUTH_RP, wire.MutualAuthRp(code, b"").encode(), option=wire.NAK, err=code
        )
        raise RemoteProtocolError(code, why)

    def _on_auth_rp(self, header: wire.Header, payload: bytes) -> list[Event]:
        rp = wire.MutualAuthRp.decode(payload)
        self._check_ack(header, rp.status, "mutual authentication")
        if not 1 <= len(rp.auth_data) <= wire.MAX_AUTH_DATA:
            raise RemoteProtocolError(ErrorCode.BAD_LENGTH, "the server sent no authentication data")
        self._peer_auth_data = rp.auth_data
        self._state = State.CLIENT_WAIT_PASS1
        return []

    def _on_pass1(self, header: wire.Header, payload: bytes) -> list[Event]:
        p1 = wire.Pass1.decode(payload)
        self._check_ack(header, p1.status, "authentication pass 1")
        if self._guard.is_ours(Role.CLIENT, p1.challenge):
            raise RemoteProtocolError(
                ErrorCode.REFLECTED_CHALLENGE,
                "the server sent a challenge that one of this process's clients issued: a reflection"
                " attack; the link was dropped",
            )
        self._rs = p1.challenge
        failed = wire.Pass2(ErrorCode.REMOTE_KEY_HOLDER, bytes(8), bytes(8))
        with self._telling_peer(MessageId.MUTUAL_AUTH_PASS2_NOTIF, failed.encode()):
            response = self._holder.internal_authenticate(self._pair_id, self._rs)
            self._rc = self._holder.get_challenge(self._pair_id)
        self._guard.issue(Role.CLIENT, self._rc)
        self._send(MessageId.MUTUAL_AUTH_PASS2_NOTIF, wire.Pass2(0, response, self._rc).encode())
        self._schedule = KeySchedule(self._holder, self._pair_id, self._rs, self._rc, client=True)
        self._deferred = self._derive_ahead  # while the server works on pass 2
        self._state = State.CLIENT_WAIT_PASS3
        return []

    def _on_pass2(self, header: wire.Header, payload: bytes) -> list[Event]:
        p2 = wire.Pass2.decode(payload)
        self._guard.release(Role.SERVER, self._rs)
        if header.option == wire.NAK or p2.status != 0:
            raise RemoteProtocolError(
                ErrorCode.REMOTE_KEY_HOLDER,
                f"the client's key holder failed to answer our challenge (status {p2.status})",
            )
        failed = wire.Pass3(ErrorCode.REMOTE_KEY_HOLDER, bytes(8), 0, bytes(8))
        with self._telling_peer(MessageId.MUTUAL_AUTH_PASS3_NOTIF, failed.encode()):
            verified = self._holder.external_authenticate(self._pair_id, self._rs, p2.response)
        if not verified:
            self._send(
                MessageId.MUTUAL_AUTH_PASS3_NOTIF,
                wire.Pass3(ErrorCode.AUTHENTICATION_FAILED, bytes(8), 0, bytes(8)).encode(),
                option=wire.NAK,
                err=ErrorCode.AUTHENTICATION_FAILED,
            )
            raise RemoteProtocolError(
                ErrorCode.AUTHENTICATION_FAILED,
                f"the client's response does not match authentication key {self._pair_id}:"
                " the two ends hold different keys at that index",
            )
        if p2.challenge == self._rs or self._guard.is_ours(Role.SERVER, p2.challenge):
            raise RemoteProtocolError(
                ErrorCode.REFLECTED_CHALLENGE, "the client sent back a challenge this server issued"
            )
        self._rc = p2.challenge
        self._schedule = KeySchedule(self._holder, self._pair_id, self._rs, self._rc, client=False)
        with self._telling_peer(MessageId.MUTUAL_AUTH_PASS3_NOTIF, failed.encode()):
            response = self._holder.internal_authenticate(self._pair_id, self._rc)
            finished = self._finished(b"server\0\0")
        self._send(MessageId.MUTUAL_AUTH_PASS3_NOTIF, wire.Pass3(0, response, 0, finished).encode())
        self._deferred = self._derive_ahead  # while the client works on pass 3
        self._state = State.SERVER_WAIT_COMPLETION
        return []

    def _on_pass3(self, header: wire.Header, payload: bytes) -> list[Event]:
        # The transcript already holds PASS3; the server's MAC covers what came before it.
        p3 = wire.Pass3.decode(payload)
        self._guard.release(Role.CLIENT, self._rc)
        if header.option == wire.NAK or p3.status != 0:
            code = header.err_no or p3.status
            raise RemoteProtocolError(
                ErrorCode.REMOTE_KEY_HOLDER if code == ErrorCode.REMOTE_KEY_HOLDER else ErrorCode.AUTHENTICATION_FAILED,
                "the server's key holder failed (see the server's log)"
                if code == ErrorCode.REMOTE_KEY_HOLDER
                else "the server rejected our response to its challenge: the two ends hold different"
                f" keys at authentication index {self._pair_id} (status {code})",
            )
        failed = wire.Completion(ErrorCode.REMOTE_KEY_HOLDER, bytes(8))
        with self._telling_peer(MessageId.MUTUAL_AUTH_COMPLETION_NOTIF, failed.encode()):
            verified = self._holder.external_authenticate(self._pair_id, self._rc, p3.response)
            expected = self._finished(b"server\0\0", self._before_last)
        if not verified:
            raise RemoteProtocolError(
                ErrorCode.AUTHENTICATION_FAILED,
                f"the server's response does not match authentication key {self._pair_id}",
            )
        if not secrets.compare_digest(expected, p3.finished):
            raise RemoteProtocolError(
                ErrorCode.AUTHENTICATION_FAILED,
                "the server's handshake MAC does not match: the handshake was altered in transit",
            )
        self._send(
            MessageId.MUTUAL_AUTH_COMPLETION_NOTIF, wire.Completion(0, self._finished(b"client\0\0")).encode()
        )
        return [self._ready()]

    def _on_completion(self, header: wire.Header, payload: bytes) -> list[Event]:
        done = wire.Completion.decode(payload)
        if header.option == wire.NAK or done.result != 0:
            if done.result == ErrorCode.REMOTE_KEY_HOLDER:
                raise RemoteProtocolError(ErrorCode.REMOTE_KEY_HOLDER, "the client's key holder failed")
            raise RemoteProtocolError(
                ErrorCode.AUTHENTICATION_FAILED, f"the client reported authentication result {done.result}"
            )
        if not secrets.compare_digest(self._finished(b"client\0\0", self._before_last), done.finished):
            raise RemoteProtocolError(
                ErrorCode.AUTHENTICATION_FAILED,
                "the client's handshake MAC does not match: the handshake was altered in transit",
            )
        return [self._ready()]

    def _finished_key(self) -> RecordKey:
        if self._fin_key is None:
            self._fin_key = self._holder.derive_key(self._pair_id, finished_block(self._rs))
        return self._fin_key

    def _derive_ahead(self) -> None:
        """The handshake-MAC key and a fixed-key link's record keys, in as few key-holder calls as can be.

        Run by prepare() while the peer is busy: they depend only on the challenges, and they are
        used only once the handshake has verified them. Keys under the same encryption key (the
        default: key 1 authenticates and encrypts) come from one call.
        """
        assert self._schedule is not None
        suite = self._outbound_suite
        blocks = self._schedule.link_blocks(suite)
        if self._fin_key is None and blocks and suite.key_id == self._pair_id:
            first, *rest = self._holder.derive_keys(self._pair_id, [finished_block(self._rs), *blocks])
            self._fin_key = first
            self._schedule.store(suite, rest)
            return
        self._finished_key()
        if blocks:
            self._schedule.store(suite, self._holder.derive_keys(suite.key_id, blocks))

    def _finished(self, label: bytes, transcript: hashlib._Hash | None = None) -> bytes:
        """The handshake MAC: DES-MAC under the finished key of label || MD5(transcript)."""
        digest = (transcript or self._transcript).digest()
        return cbc_mac(self._finished_key(), label + digest)

    def _ready(self) -> LinkReady:
        self._state = State.READY
        assert self._schedule is not None
        if self._schedule.link_blocks(self._outbound_suite):
            self._deferred = self._derive_ahead  # (if prepare() has not run since the last pass)
        self.parameters = LinkParameters(
            version=wire.VERSION.decode(),
            block_length=self._block_length,
            auth_key_id=self._pair_id,
            enc_key_id=self.config.enc_key_id,
            encryption=self.config.encryption,
            mac=self.config.mac,
            peer_auth_data=self._peer_auth_data,
        )
        return LinkReady(self.parameters)

    def _check_ack(self, header: wire.Header, status: int, what: str) -> None:
        if header.option == wire.NAK or status != 0:
            code = header.err_no or status
            known = ErrorCode(code) if code in ErrorCode._value2member_map_ else ErrorCode.RECEIVED_NAK
            raise RemoteProtocolError(known, f"the peer refused {what} (code {code}, {known.name})")

    # --- message transfer: sending ------------------------------------------------------------

    def _require_ready(self, what: str) -> None:
        if self._state is not State.READY or self._close_wanted:
            raise LocalProtocolError(
                ErrorCode.BAD_STATE, f"cannot {what}: the link is {self._state.name.lower()}"
            )

    def _start_next_message(self) -> None:
        if not self._queue:
            self._maybe_send_close()
            return
        data = self._queue.popleft()
        suite = self._outbound_suite
        self._pending = data
        self._send(
            MessageId.MESSAGE_TRANSMISSION_RQ,
            wire.TransmissionRq(suite.encryption, suite.key_id, suite.mac, len(data)).encode(),
        )

    def _on_transmission_rp(self, header: wire.Header, payload: bytes) -> list[Event]:
        rp = wire.TransmissionRp.decode(payload)
        data = self._pending
        if data is None or self._pending_random is not None:
            raise _unexpected(MessageId.MESSAGE_TRANSMISSION_RP, "no message request is outstanding")
        if header.option == wire.NAK or rp.result != 0:
            self._pending = self._sealed_ahead = None
            self._start_next_message()
            return [MessageRefused(header.err_no or rp.result, len(data), rp.max_length)]
        suite = self._outbound_suite
        if suite.key_id == wire.SESSION_KEYS:
            self._pending_random = self._random(8)
            self._send(MessageId.RNDNO_FOR_SESSION_KEY_RQ, wire.RandomNumberRq(self._pending_random).encode())
            return []
        return self._seal(suite, None)

    def _on_random_rp(self, header: wire.Header, payload: bytes) -> list[Event]:
        status = wire.decode_status(payload, "session-key random number response")
        if self._pending_random is None:
            raise _unexpected(MessageId.RNDNO_FOR_SESSION_KEY_RP, "no random number was sent")
        self._check_ack(header, status, "the session-key random number")
        random, self._pending_random = self._pending_random, None
        return self._seal(self._outbound_suite, random)

    def _seal(self, suite: Suite, random: bytes | None) -> list[Event]:
        data = self._pending
        assert data is not None
        self._pending = None
        if self._sealed_ahead is not None:
            sealer, frames = self._sealed_ahead
            self._sealed_ahead = None
            self._send_chain = sealer.chain  # adopt the copy the first blocks were sealed on
            self._out += frames
            self._sealed_out = True
        else:
            keys = self._keys(True, suite, random)
            sealer = Sealer(suite, keys, self._send_chain, data, self._block_length)
        if sealer.done:
            self._start_next_message()
        else:
            self._sealer = sealer
        return [MessageSent(len(data))]

    def seal_ahead(self) -> bool:
        """Seal more of the requested message while the peer has yet to accept it; False if nothing was.

        The receiver answers a request only once it has worked through every block before it, so
        without this the sender would idle for that long on every message. :meth:`prepare` seals the
        first :data:`_SEAL_AHEAD_BYTES`: the receiver is then at most that far behind, and the rest
        streams out a batch at a time while the receiver deciphers what came before. A transport
        that can tell whether the answer has arrived calls this until it has, or until this returns
        False: each call seals a little more, up to :data:`_SEAL_AHEAD_LIMIT`, so the sender works
        instead of waiting. Sealing runs on a copy of the chain, adopted if the peer accepts and
        dropped (the chain unmoved) if it refuses. Unique session keys depend on the random number
        the sender sends after the acceptance, so those messages are sealed from then on: the
        sender derives its keys while the receiver derives its own, before it answers.
        """
        suite, random = self._outbound_suite, self._pending_random
        if self._pending is None or self._state is State.ERROR:
            return False
        if suite.key_id == wire.SESSION_KEYS and random is None:
            return False
        if self._sealed_ahead is None:
            try:
                keys = self._keys(True, suite, random)
            except KeyHolderError:
                return False  # reported when the message is sealed after all, once the peer has accepted it
            sealer = Sealer(suite, keys, self._send_chain.copy(), self._pending, self._block_length)
            self._sealed_ahead = (sealer, [sealer.next_frames(max(1, _SEAL_AHEAD_BYTES // self._block_length))])
            return True
        sealer, frames = self._sealed_ahead
        if sealer.done or sealer.offset >= _SEAL_AHEAD_LIMIT:
            return False
        frames.append(sealer.next_frames(max(1, _SEAL_AHEAD_STEP // self._block_length)))
        return True

    def _keys(self, outbound: bool, suite: Suite, random: bytes | None) -> MessageKeys | None:
        if not suite.needs_keys:
            return None
        assert self._schedule is not None
        return self._schedule.keys(outbound, suite, random)

    # --- message transfer: receiving ----------------------------------------------------------

    def _on_transmission_rq(self, header: wire.Header, payload: bytes) -> list[Event]:
        rq = wire.TransmissionRq.decode(payload)
        if self._incoming is not None or self._opener is not None:
            raise _unexpected(MessageId.MESSAGE_TRANSMISSION_RQ, "the previous message is unfinished")
        mine = self._outbound_suite
        code: ErrorCode | None = None
        if (rq.encryption, rq.key_id, rq.mac) != (mine.encryption, mine.key_id, mine.mac):
            code = ErrorCode.TRANSMISSION_MISMATCH
        elif rq.length > self.config.max_message:
            code = ErrorCode.PEER_LENGTH_TOO_SMALL
        if code is not None:
            self.peer_request = rq
            self._send(
                MessageId.MESSAGE_TRANSMISSION_RP,
                wire.TransmissionRp(code, self.config.max_message).encode(),
                option=wire.NAK,
                err=code,
            )
            return []
        if mine.key_id == wire.SESSION_KEYS:
            self._send(
                MessageId.MESSAGE_TRANSMISSION_RP, wire.TransmissionRp(0, self.config.max_message).encode()
            )
            self._incoming, self._incoming_length = mine, rq.length
            return []
        failed = wire.TransmissionRp(ErrorCode.REMOTE_KEY_HOLDER, self.config.max_message)
        with self._telling_peer(MessageId.MESSAGE_TRANSMISSION_RP, failed.encode()):
            self._open(mine, rq.length, None)  # keys first: a key holder failure is answered with NAK
        self._send(
            MessageId.MESSAGE_TRANSMISSION_RP, wire.TransmissionRp(0, self.config.max_message).encode()
        )
        return []

    def _on_random_rq(self, header: wire.Header, payload: bytes) -> list[Event]:
        rq = wire.RandomNumberRq.decode(payload)
        suite, self._incoming = self._incoming, None
        if suite is None:
            raise RemoteProtocolError(
                ErrorCode.RANDOM_NUMBER_EXPECTED, "the peer sent a session-key random number unasked"
            )
        with self._telling_peer(MessageId.RNDNO_FOR_SESSION_KEY_RP, wire.encode_status(ErrorCode.REMOTE_KEY_HOLDER)):
            self._open(suite, self._incoming_length, rq.random)
        self._send(MessageId.RNDNO_FOR_SESSION_KEY_RP, wire.encode_status(0))
        return []

    def _open(self, suite: Suite, length: int, random: bytes | None) -> None:
        keys = self._keys(False, suite, random)
        self._opener = Opener(suite, keys, self._recv_chain, length, self._block_length)

    def _on_block(self, header: wire.Header, payload: bytes) -> list[Event]:
        if self._opener is None or self._opener.complete:
            code = ErrorCode.RANDOM_NUMBER_EXPECTED if self._incoming else ErrorCode.BAD_MESSAGE_ID
            raise RemoteProtocolError(code, "the peer sent a data block that no accepted request announced")
        self._opener.add_block(payload)
        return []

    def _on_mac(self, header: wire.Header, payload: bytes) -> list[Event]:
        opener, self._opener = self._opener, None
        if opener is None or not opener.complete:
            raise RemoteProtocolError(
                ErrorCode.BAD_MAC, "the peer sent a MAC before the whole message: it was truncated"
            )
        return [MessageReceived(opener.finish(payload))]

    def _on_through(self, header: wire.Header, payload: bytes) -> list[Event]:
        if not self.config.through_mode:
            raise RemoteProtocolError(
                ErrorCode.THROUGH_MODE_DISABLED,
                "the peer sent unprotected (through-mode) data, which this end does not accept",
            )
        return [NonSecureReceived(payload)]

    # --- line disconnection -------------------------------------------------------------------

    def _maybe_send_close(self) -> None:
        if (
            self._close_wanted
            and self._state is State.READY
            and not self._queue
            and self._pending is None
            and self._sealer is None  # the request must not overtake the last blocks of a message
        ):
            self._send(MessageId.LINE_DISCONNECTION_RQ, b"")
            self._state = State.CLOSING

    def _on_close_rq(self, header: wire.Header, payload: bytes) -> list[Event]:
        if payload:
            raise RemoteProtocolError(ErrorCode.BAD_LENGTH, "a line disconnection request carries no data")
        busy = self._state is State.READY and (not self.idle or self._close_wanted)
        # accept_close refuses a close the peer starts, not one we asked for ourselves (CLOSING).
        if busy or (not self.config.accept_close and self._state is not State.CLOSING):
            code = ErrorCode.PEER_REFUSED_CLOSE
            self._send(MessageId.LINE_DISCONNECTION_RP, wire.encode_status(code), option=wire.NAK, err=code)
            return []
        self._send(MessageId.LINE_DISCONNECTION_RP, wire.encode_status(0))
        if self._state is State.CLOSING:
            return []  # both ends asked; we finish when our own request is answered
        self._state = State.CLOSED
        return [Closed(by_peer=True)]

    def _on_close_rp(self, header: wire.Header, payload: bytes) -> list[Event]:
        status = wire.decode_status(payload, "line disconnection response")
        if self._state is not State.CLOSING:
            raise _unexpected(MessageId.LINE_DISCONNECTION_RP, "no disconnection was requested")
        if header.option == wire.NAK or status != 0:
            self._state = State.READY
            self._close_wanted = False
            return [CloseRefused(header.err_no or status)]
        self._state = State.CLOSED
        return [Closed(by_peer=False)]

    def _end_of_stream(self) -> list[Event]:
        if self._state is State.CLOSED:
            return []
        was = self._state
        self._fail()
        if was in (State.READY, State.CLOSING):
            where = "in the middle of a message" if not self.idle or self._inbuf else "without disconnecting"
        else:
            where = f"during the handshake ({was.name})"
        raise RemoteProtocolError(ErrorCode.CONNECTION_LOST, f"the peer closed the connection {where}")


def _unexpected(mid: MessageId, why: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.BAD_MESSAGE_ID, f"the peer sent {mid.name}, but {why}")


_Handler = Callable[[Connection, wire.Header, bytes], list[Event]]

_HANDLERS: dict[int, _Handler] = {
    MessageId.LINE_CONNECTION_CHECK_RQ: Connection._on_line_rq,
    MessageId.LINE_CONNECTION_CHECK_RP: Connection._on_line_rp,
    MessageId.MUTUAL_AUTH_RQ: Connection._on_auth_rq,
    MessageId.MUTUAL_AUTH_RP: Connection._on_auth_rp,
    MessageId.MUTUAL_AUTH_PASS1_NOTIF: Connection._on_pass1,
    MessageId.MUTUAL_AUTH_PASS2_NOTIF: Connection._on_pass2,
    MessageId.MUTUAL_AUTH_PASS3_NOTIF: Connection._on_pass3,
    MessageId.MUTUAL_AUTH_COMPLETION_NOTIF: Connection._on_completion,
    MessageId.MESSAGE_TRANSMISSION_RQ: Connection._on_transmission_rq,
    MessageId.MESSAGE_TRANSMISSION_RP: Connection._on_transmission_rp,
    MessageId.RNDNO_FOR_SESSION_KEY_RQ: Connection._on_random_rq,
    MessageId.RNDNO_FOR_SESSION_KEY_RP: Connection._on_random_rp,
    MessageId.MESSAGE_TRANSMISSION_NOTIF: Connection._on_block,
    MessageId.MAC_TRANSMISSION_NOTIF: Connection._on_mac,
    MessageId.THROUGH_MODE_TRANSMISSION_NOTIF: Connection._on_through,
    MessageId.LINE_DISCONNECTION_RQ: Connection._on_close_rq,
    MessageId.LINE_DISCONNECTION_RP: Connection._on_close_rp,
}
"""Which handler each message id goes to, once _EXPECTED has admitted it in the current state."""
