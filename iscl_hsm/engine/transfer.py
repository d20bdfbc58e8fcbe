"""Message transfer and line disconnection: the last two ISCL protocols, on an authenticated link.

Theory of operation
-------------------
Per message, either end::

    sender                                     receiver
      MESSAGE_TRANSMISSION_RQ (enc, key id, mac, length) ->
                                               <- MESSAGE_TRANSMISSION_RP (ACK or NAK, largest message)
      [RNDNO_FOR_SESSION_KEY_RQ (R) ->         <- RNDNO_FOR_SESSION_KEY_RP]     (key id 0x10)
      MESSAGE_TRANSMISSION_NOTIF (one block) ... MAC_TRANSMISSION_NOTIF ->
    THROUGH_MODE_TRANSMISSION_NOTIF carries unprotected data; LINE_DISCONNECTION_RQ -> RP ends the link.

Three small machines share the link: :class:`~iscl_hsm.engine.state.Outbound` (our message),
:class:`~iscl_hsm.engine.state.Inbound` (the peer's) and the link itself (READY, CLOSING, CLOSED).
Every message id belongs to one of them, and :data:`TABLE` maps (that machine's state, message) to
(handler, next state), h2-style: the next state is entered, then the handler runs, and may move it
on (a refused request goes back to IDLE). A pair not in the table is refused on its header (104).

How the two directions share the link is the profile's *floor*: the hardened profile has a CBC chain
per direction and lets both be busy at once; V1.00 has one chain for both, so one transmission at a
time, and when two requests cross the server's goes first (:class:`HalfDuplex`).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from .. import wire
from ..errors import ErrorCode, KeyHolderError, LocalProtocolError, RemoteProtocolError
from ..wire import MessageId
from .config import Config, Role
from .events import (
    Closed,
    CloseRefused,
    Event,
    MessageReceived,
    MessageRefused,
    MessageSent,
    NonSecureReceived,
)
from .handshake import Handoff
from .outbox import Outbox
from .profile import WireProfile, suite_of
from .record import MessageKeys, Opener, Sealer, same
from .state import Inbound, Outbound, State, Waiting

OUTBOUND_BATCH = 8
"""Data blocks sealed per :meth:`Transfer.produce` call (64 KiB at the largest block length): few
enough that the receiver starts deciphering while the sender still enciphers, enough to keep the
per-call work (Python, one send) small. Against 4: with no protection both ends of a loopback link
spent a fifth less CPU per MiB, with MD5 alone the rate rose 5-14%, and with DES the difference was
within this machine's noise; against 16, the receiver waited longer for each batch and DES-CBC + MD5
lost 8% (docs/performance.md)."""

SEAL_AHEAD_BYTES = 32 * 1024
"""How much of a requested message :meth:`Transfer.prepare` seals before the peer accepts it (see
:meth:`Transfer.seal_ahead`). Enough to cover the acceptance's round trip; more, sealed in one go,
would make the receiver wait that much longer for the first block whenever it was idle (as it is at
the start of every DICOM object)."""

SEAL_AHEAD_STEP = 16 * 1024
"""What each further :meth:`Transfer.seal_ahead` call seals: little, so that a transport calling it
until the acceptance arrives sends the sealed blocks soon after."""

SEAL_AHEAD_LIMIT = 256 * 1024
"""The most of one message :meth:`Transfer.seal_ahead` seals before the peer accepts it: bounds the
memory held by sealed frames that may yet be dropped (when the peer refuses)."""

DECIPHER_BATCH = 4 * 8 * 1024
"""Received ciphertext deciphered in one call once this much has accumulated."""

_INBOUND = frozenset(
    {
        MessageId.MESSAGE_TRANSMISSION_RQ,
        MessageId.RNDNO_FOR_SESSION_KEY_RQ,
        MessageId.MESSAGE_TRANSMISSION_NOTIF,
        MessageId.MAC_TRANSMISSION_NOTIF,
    }
)
_OUTBOUND = frozenset({MessageId.MESSAGE_TRANSMISSION_RP, MessageId.RNDNO_FOR_SESSION_KEY_RP})


class Floor:
    """How the two directions share the link (the hardened profile: independently)."""

    def admit(self, transfer: Transfer, rq: wire.TransmissionRq) -> bool:
        """May the peer's request be answered now? False holds it until our transmission is over."""
        return True

    def may_start(self, transfer: Transfer) -> bool:
        """May our next request go out now?"""
        return True

    def check_answer(self, transfer: Transfer) -> None:
        """Raise if the peer's answer to our request cannot come now."""

    def after_inbound(self, transfer: Transfer) -> None:
        """The peer's message is over (verified)."""


class HalfDuplex(Floor):
    """V1.00: one transmission at a time, since one CBC chain serves both directions.

    A request waits until the link is quiet. When two requests cross (each end sent one before it
    saw the other's), the server's goes first: the server holds the client's request and answers it
    once its own message is over; the client answers the server's at once and keeps waiting for the
    answer to its own. Blocks the client sealed ahead are dropped, since the chain moves first.
    """

    def admit(self, transfer: Transfer, rq: wire.TransmissionRq) -> bool:
        if transfer.outbound is Outbound.IDLE:
            return True
        if transfer.outbound is not Outbound.AWAIT_ANSWER:
            raise RemoteProtocolError(
                ErrorCode.BAD_MESSAGE_ID,
                "the peer sent MESSAGE_TRANSMISSION_RQ while our message was under way; a V1.00 link"
                " carries one message at a time",
            )
        if transfer.role is Role.SERVER:
            return False
        transfer.drop_sealed_ahead()
        return True

    def may_start(self, transfer: Transfer) -> bool:
        return transfer.inbound is Inbound.IDLE

    def check_answer(self, transfer: Transfer) -> None:
        """The server answers a crossing request only once its own message is over, so an answer that
        overtakes that message's MAC was reordered on the way (it would start our message on the
        shared chain before the peer's ends)."""
        if transfer.inbound in (Inbound.AWAIT_RANDOM, Inbound.RECEIVING):
            raise RemoteProtocolError(
                ErrorCode.BAD_MESSAGE_ID,
                "the peer answered our message request before its own message was over; a V1.00 link"
                " carries one message at a time",
            )

    def after_inbound(self, transfer: Transfer) -> None:
        if transfer.outbound is Outbound.IDLE:
            transfer.start_next_message()


_FLOORS: dict[bool, Floor] = {False: Floor(), True: HalfDuplex()}


class Transfer:
    """Message transfer and line disconnection on one authenticated link."""

    __slots__ = (
        "_close_wanted",
        "_floor",
        "_form",
        "_held",
        "_incoming_length",
        "_keys",
        "_layout",
        "_opener",
        "_outbox",
        "_pending",
        "_pending_random",
        "_queue",
        "_random",
        "_received",
        "_recv_chain",
        "_sealed_ahead",
        "_sealed_out",
        "_sealer",
        "_send_chain",
        "_sent",
        "_suite",
        "block_length",
        "config",
        "deferred",
        "inbound",
        "outbound",
        "peer_request",
        "peer_request_code",
        "role",
        "state",
    )  # one per link: an instance dict would cost 1.6 KB of each

    def __init__(
        self,
        role: Role,
        config: Config,
        profile: WireProfile,
        handoff: Handoff,
        out: list[bytes],
        random: Callable[[int], bytes],
    ) -> None:
        self.role = role
        self.state = State.READY
        self.outbound = Outbound.IDLE
        self.inbound = Inbound.IDLE
        self.block_length = handoff.parameters.block_length
        self.deferred: Callable[[], object] | None = None
        #: The last message request the peer made that we refused (GetPeer...ISCL in the SDK), and why.
        self.peer_request: wire.TransmissionRq | None = None
        self.peer_request_code: ErrorCode | None = None
        self.config = config
        self._layout = profile.layout
        self._floor = _FLOORS[profile.half_duplex]
        self._form = profile.record_format(config)
        self._suite = suite_of(config)
        self._keys = handoff.keys
        self._send_chain, self._recv_chain = profile.chains()
        self._outbox = Outbox(self._layout, out)
        self._random = random
        self._queue: list[bytes] = []  # messages waiting their turn (a few: a list is lighter than a deque)
        self._pending: bytes | None = None  # requested, not yet accepted
        self._pending_random: bytes | None = None
        self._sealer: Sealer | None = None
        self._sealed_ahead: tuple[Sealer, list[bytes]] | None = None  # the pending message's start
        self._sealed_out = False  # the output holds blocks sealed ahead, just accepted
        self._close_wanted = False
        self._held: wire.TransmissionRq | None = None
        self._incoming_length = 0
        self._opener: Opener | None = None
        self._sent = 0  # secured messages sent whole, and received and verified: the disconnection MACs' counts
        self._received = 0

    # --- what the connection asks -------------------------------------------------------------

    def _machine_state(self, mid: MessageId) -> Enum:
        if mid in _INBOUND:
            return self.inbound
        if mid in _OUTBOUND:
            return self.outbound
        return self.state

    def accepts(self, mid: MessageId) -> bool:
        return self.state is not State.CLOSED and (self._machine_state(mid), mid) in TABLE

    def check_header(self, mid: MessageId, length: int) -> None:
        """Refuse, before its payload is read, a message this end does not take or that is too long."""
        if mid is MessageId.THROUGH_MODE_TRANSMISSION_NOTIF and not self.config.through_mode:
            raise RemoteProtocolError(
                ErrorCode.THROUGH_MODE_DISABLED,
                "the peer sent unprotected (through-mode) data, which this end does not accept",
            )
        if mid is MessageId.MESSAGE_TRANSMISSION_NOTIF:
            limit, code = self.block_length, ErrorCode.BAD_BLOCK_LENGTH
        elif mid is MessageId.THROUGH_MODE_TRANSMISSION_NOTIF:
            limit, code = self.config.max_message, ErrorCode.BAD_LENGTH
        else:
            limit, code = wire.CONTROL_LIMIT, ErrorCode.BAD_LENGTH
        if length > limit:
            raise RemoteProtocolError(
                code, f"the peer announced {length} bytes of {mid.name}; at most {limit} are allowed"
            )

    def handle(self, header: wire.Header, payload: bytes) -> list[Event]:
        mid = MessageId(header.message_id)
        handler, target = TABLE[self._machine_state(mid), mid]
        self._enter(target)
        return handler(self, header, payload)

    def _enter(self, target: Enum) -> None:
        if isinstance(target, Inbound):
            self.inbound = target
        elif isinstance(target, Outbound):
            self.outbound = target
        else:
            assert isinstance(target, State)
            self.state = target

    @property
    def receiving(self) -> Opener | None:
        """The message whose blocks are coming in, for the connection's fast path."""
        return self._opener if self.inbound is Inbound.RECEIVING else None

    @property
    def idle(self) -> bool:
        """True when nothing is queued, in flight or half received."""
        return not self._queue and self.outbound is Outbound.IDLE and self.inbound is Inbound.IDLE

    @property
    def waiting(self) -> Waiting:
        """What this end waits for from the peer (the most pressing first)."""
        if self.state is State.CLOSED:
            return Waiting.NOTHING
        if self.state is State.CLOSING:
            return Waiting.CLOSE
        if self.outbound in (Outbound.AWAIT_ANSWER, Outbound.AWAIT_RANDOM_ANSWER):
            return Waiting.ANSWER
        if self.inbound in (Inbound.AWAIT_RANDOM, Inbound.RECEIVING):
            return Waiting.MESSAGE
        return Waiting.IDLE

    @property
    def may_block(self) -> bool:
        if self.deferred is not None:
            return True
        if self.state is State.CLOSED:
            return False
        return not self._keys.holder_free()

    # --- the application's calls --------------------------------------------------------------

    def send_message(self, data: bytes) -> None:
        self._require_ready("send a message")
        if len(data) > self.config.max_message:
            raise LocalProtocolError(
                ErrorCode.LOCAL_LENGTH_TOO_SMALL,
                f"a message of {len(data)} bytes exceeds the local maximum of"
                f" {self.config.max_message}; raise --max-message or split the data",
            )
        self._queue.append(bytes(data))
        if self.outbound is Outbound.IDLE:
            self.start_next_message()

    def send_non_secure(self, data: bytes) -> None:
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
        self._outbox.send(MessageId.THROUGH_MODE_TRANSMISSION_NOTIF, data)

    def close(self) -> None:
        self._require_ready("close the line")
        self._close_wanted = True
        self._maybe_send_close()

    def produce(self) -> None:
        """Put the next batch of the outgoing message in the output, unless blocks sealed ahead are there.

        Blocks sealed ahead of the peer's acceptance go out on their own, without a further batch
        sealed first: the peer is waiting for them.
        """
        if self._sealed_out:
            self._sealed_out = False
        elif self._sealer is not None:
            self._outbox.put(self._sealer.next_frames(OUTBOUND_BATCH))
            if self._sealer.done:
                self._sealer = None
                self._outbound_over()

    def seal_ahead(self) -> bool:
        """Seal more of the requested message while the peer has yet to accept it; False if nothing was.

        The receiver answers a request only once it has worked through every block before it, so
        without this the sender would idle for that long on every message. The first call seals
        :data:`SEAL_AHEAD_BYTES`: the receiver is then at most that far behind, and the rest streams
        out a batch at a time while the receiver deciphers what came before. A transport that can
        tell whether the answer has arrived calls this until it has, or until this returns False:
        each call seals a little more, up to :data:`SEAL_AHEAD_LIMIT`, so the sender works instead of
        waiting. Sealing runs on a copy of the chain, adopted if the peer accepts with the chain where
        it was, and dropped (the chain unmoved) if it refuses or the chain moved meanwhile. Unique
        session keys depend on the random number the sender sends after the acceptance, so those
        messages are sealed from then on: the sender derives its keys while the receiver derives its
        own, before it answers.
        """
        random = self._pending_random
        if self._pending is None or not self._floor.may_start(self):
            return False
        if self._suite.session_keys and random is None:
            return False
        if self._sealed_ahead is None:
            try:
                keys = self._message_keys(True, random)
            except KeyHolderError:
                return False  # reported when the message is sealed after all, once the peer has accepted it
            sealer = Sealer(self._form, keys, self._send_chain.copy(), self._pending, self.block_length)
            self._sealed_ahead = (sealer, [sealer.next_frames(max(1, SEAL_AHEAD_BYTES // self.block_length))])
            return True
        sealer, frames = self._sealed_ahead
        if sealer.done or sealer.offset >= SEAL_AHEAD_LIMIT:
            return False
        frames.append(sealer.next_frames(max(1, SEAL_AHEAD_STEP // self.block_length)))
        return True

    def begin_sealing_ahead(self) -> None:
        """Seal the start of a requested message, unless that is done already (Connection.prepare)."""
        if self._sealed_ahead is None:
            self.seal_ahead()

    def drop_sealed_ahead(self) -> None:
        self._sealed_ahead = None

    # --- sending ------------------------------------------------------------------------------

    def _require_ready(self, what: str) -> None:
        if self.state is not State.READY or self._close_wanted:
            raise LocalProtocolError(ErrorCode.BAD_STATE, f"cannot {what}: the link is {self.state.name.lower()}")

    def start_next_message(self) -> None:
        """Request the next queued message, if the floor allows; else see whether to disconnect."""
        if not self._floor.may_start(self):
            return
        if not self._queue:
            self._maybe_send_close()
            return
        data = self._pending = self._queue.pop(0)
        suite = self._suite
        self.outbound = Outbound.AWAIT_ANSWER
        self._outbox.send(
            MessageId.MESSAGE_TRANSMISSION_RQ,
            wire.TransmissionRq(suite.encryption, suite.key_id, suite.mac, len(data)).encode(),
        )

    def _outbound_over(self) -> None:
        """Our message went out whole, or was refused: answer a held request, or request the next."""
        self.outbound = Outbound.IDLE
        held, self._held = self._held, None
        if held is not None:
            self.inbound = Inbound.RECEIVING
            self._answer(held)
        else:
            self.start_next_message()

    def _on_answer(self, header: wire.Header, payload: bytes) -> list[Event]:
        self._floor.check_answer(self)
        rp = wire.TransmissionRp.decode(payload)
        data = self._pending
        assert data is not None
        if header.option == wire.NAK or rp.result != 0:
            self._pending = self._sealed_ahead = None
            code = self._layout.refusal_code(header, rp, len(data))
            self._outbound_over()
            return [MessageRefused(code, len(data), rp.max_length)]
        if self._suite.session_keys:
            self.outbound = Outbound.AWAIT_RANDOM_ANSWER
            self._pending_random = self._random(8)
            self._outbox.send(MessageId.RNDNO_FOR_SESSION_KEY_RQ, wire.RandomNumberRq(self._pending_random).encode())
            return []
        return self._seal(None)

    def _on_random_answer(self, header: wire.Header, payload: bytes) -> list[Event]:
        self._floor.check_answer(self)
        status = wire.decode_status(payload, "session-key random number response")
        self._outbox.check_answer(header, status, "the session-key random number")
        random, self._pending_random = self._pending_random, None
        return self._seal(random)

    def _seal(self, random: bytes | None) -> list[Event]:
        data = self._pending
        assert data is not None
        self._pending = None
        self._sent += 1
        ahead, self._sealed_ahead = self._sealed_ahead, None
        if ahead is not None and ahead[0].moves_at_start == self._send_chain.moves:
            sealer, frames = ahead
            self._send_chain.adopt(sealer.chain)  # go on from where the blocks sealed ahead left it
            sealer.chain = self._send_chain
            for batch in frames:
                self._outbox.put(batch)
            self._sealed_out = True
        else:
            keys = self._message_keys(True, random)
            sealer = Sealer(self._form, keys, self._send_chain, data, self.block_length)
        if sealer.done:
            self._outbound_over()
        else:
            self._sealer = sealer
        return [MessageSent(len(data))]

    def _message_keys(self, outbound: bool, random: bytes | None) -> MessageKeys | None:
        return self._keys.keys(outbound, random)

    # --- receiving ----------------------------------------------------------------------------

    def _on_request(self, header: wire.Header, payload: bytes) -> list[Event]:
        rq = wire.TransmissionRq.decode(payload)
        if not self._floor.admit(self, rq):
            self.inbound, self._held = Inbound.HELD, rq
            return []
        return self._answer(rq)

    def _answer(self, rq: wire.TransmissionRq) -> list[Event]:
        """Accept or refuse the peer's request (inbound is RECEIVING on entry)."""
        suite, limit = self._suite, self.config.max_message
        code: ErrorCode | None = None
        if (rq.encryption, rq.key_id, rq.mac) != (suite.encryption, suite.key_id, suite.mac):
            code = ErrorCode.TRANSMISSION_MISMATCH
        elif rq.length > limit:
            code = ErrorCode.PEER_LENGTH_TOO_SMALL
        if code is not None:
            self.inbound = Inbound.IDLE
            self.peer_request = rq
            self.peer_request_code = ErrorCode.LOCAL_LENGTH_TOO_SMALL if code is ErrorCode.PEER_LENGTH_TOO_SMALL else code
            rp = wire.TransmissionRp(self._layout.rp_result(code), limit)
            self._outbox.nak(MessageId.MESSAGE_TRANSMISSION_RP, rp.encode(), code)
            return []
        self._incoming_length = rq.length
        if suite.session_keys:
            self.inbound = Inbound.AWAIT_RANDOM
        else:
            failed = wire.TransmissionRp(self._layout.rp_result(ErrorCode.REMOTE_KEY_HOLDER), limit)
            with self._outbox.telling_peer(MessageId.MESSAGE_TRANSMISSION_RP, failed.encode()):
                self._open(None)  # keys first: a key holder failure is answered with NAK
        self._outbox.send(MessageId.MESSAGE_TRANSMISSION_RP, wire.TransmissionRp(0, limit).encode())
        return []

    def _on_random_request(self, header: wire.Header, payload: bytes) -> list[Event]:
        rq = wire.RandomNumberRq.decode(payload)
        with self._outbox.telling_peer(MessageId.RNDNO_FOR_SESSION_KEY_RP, wire.encode_status(ErrorCode.REMOTE_KEY_HOLDER)):
            self._open(rq.random)
        self._outbox.send(MessageId.RNDNO_FOR_SESSION_KEY_RP, wire.encode_status(0))
        return []

    def _open(self, random: bytes | None) -> None:
        keys = self._message_keys(False, random)
        self._opener = Opener(self._form, keys, self._recv_chain, self._incoming_length, self.block_length)

    def _on_block(self, header: wire.Header, payload: bytes) -> list[Event]:
        opener = self._opener
        assert opener is not None
        if opener.complete:
            raise RemoteProtocolError(
                ErrorCode.BAD_MESSAGE_ID, "the peer sent a data block that no accepted request announced"
            )
        opener.add_block(payload)
        if opener.backlog >= DECIPHER_BATCH:
            opener.process()
        return []

    def _on_mac(self, header: wire.Header, payload: bytes) -> list[Event]:
        opener, self._opener = self._opener, None
        assert opener is not None
        if not opener.complete:
            _mac_without_message(self, header, payload)
        events: list[Event] = [MessageReceived(opener.finish(payload))]
        self._received += 1
        self._floor.after_inbound(self)
        self._maybe_send_close()
        return events

    def _on_through(self, header: wire.Header, payload: bytes) -> list[Event]:
        return [NonSecureReceived(payload)]

    # --- line disconnection -------------------------------------------------------------------

    def _maybe_send_close(self) -> None:
        """Ask to disconnect once nothing is queued or on its way in either direction."""
        if (
            self._close_wanted
            and self.state is State.READY
            and not self._queue
            and self.outbound is Outbound.IDLE  # the request must not overtake the last blocks of a message
            and self.inbound is Inbound.IDLE  # nor end the link under a message still coming in
            and self._floor.may_start(self)
        ):
            mac = self._disconnection_mac(wire.LABEL_CLOSE_RQ, ours=True)
            self._outbox.send(MessageId.LINE_DISCONNECTION_RQ, wire.DisconnectionRq(mac).encode())
            self.state = State.CLOSING

    def _on_close_request(self, header: wire.Header, payload: bytes) -> list[Event]:
        rq = wire.DisconnectionRq.decode(payload, self._layout)
        try:
            self._refuse_if_cut_short("asked to disconnect")
            self._verify_disconnection(rq.mac, wire.LABEL_CLOSE_RQ, "request")
        except RemoteProtocolError as exc:
            self._answer_close(exc.code)
            raise
        asked = self.state is State.CLOSING  # both ends asked: we finish when our own request is answered
        crossing = self.outbound is Outbound.AWAIT_ANSWER or bool(self._queue) or self._close_wanted
        # accept_close refuses a close the peer starts, not one we asked for ourselves (CLOSING).
        if not asked and (crossing or not self.config.accept_close):
            self.state = State.READY
            self._answer_close(ErrorCode.PEER_REFUSED_CLOSE)
            return []
        self._answer_close(0)
        return [] if asked else [Closed(by_peer=True)]

    def _on_close_answer(self, header: wire.Header, payload: bytes) -> list[Event]:
        rp = wire.DisconnectionRp.decode(payload, self._layout)
        if header.option == wire.NAK or rp.status != 0:
            if self._layout.nak_code(header, rp.status) == ErrorCode.PEER_REFUSED_CLOSE:
                self.state = State.READY
                self._close_wanted = False
                return [CloseRefused(ErrorCode.PEER_REFUSED_CLOSE)]
            self._outbox.check_answer(header, rp.status, "the line disconnection")
        self._refuse_if_cut_short("accepted the disconnection")
        self._verify_disconnection(rp.mac, wire.LABEL_CLOSE_RP, "response")
        return [Closed(by_peer=False)]

    def _answer_close(self, code: int) -> None:
        """LINE_DISCONNECTION_RP: ACK (``code`` 0) or a NAK refusing with ``code``; hardened: with our MAC."""
        rp = wire.DisconnectionRp(code, self._disconnection_mac(wire.LABEL_CLOSE_RP, ours=True)).encode()
        if code:
            self._outbox.nak(MessageId.LINE_DISCONNECTION_RP, rp, code)
        else:
            self._outbox.send(MessageId.LINE_DISCONNECTION_RP, rp)

    def _disconnection_mac(self, label: bytes, *, ours: bool) -> bytes:
        """The MAC over this end's message counts, as made by us or by the peer (b"" in V1.00)."""
        client = self.role is Role.CLIENT
        c2s, s2c = (self._sent, self._received) if client else (self._received, self._sent)
        return self._keys.proof(label, wire.message_counts(client == ours, c2s, s2c))

    def _verify_disconnection(self, mac: bytes, label: bytes, what: str) -> None:
        if not same(mac, self._disconnection_mac(label, ours=False)):
            raise RemoteProtocolError(
                ErrorCode.BAD_DISCONNECTION,
                f"the peer's line disconnection {what} does not verify: it was forged or altered, or"
                f" messages were lost on the way (this end sent {self._sent} and received"
                f" {self._received}); nothing after the last verified message can be trusted",
            )

    def _refuse_if_cut_short(self, what: str) -> None:
        """A disconnection never completes while a message is half sent or half received."""
        if self.inbound is not Inbound.IDLE:
            whose = f"its message of {self._incoming_length} bytes" if self._opener else "its announced message"
            raise RemoteProtocolError(
                ErrorCode.TRUNCATED, f"the peer {what} before {whose} had arrived whole: it was cut short"
            )
        if self.outbound in (Outbound.AWAIT_RANDOM_ANSWER, Outbound.STREAMING):
            raise RemoteProtocolError(
                ErrorCode.TRUNCATED, f"the peer {what} while our message, which it had accepted, was still on its way"
            )


def _unasked_random(transfer: Transfer, header: wire.Header, payload: bytes) -> list[Event]:
    raise RemoteProtocolError(ErrorCode.RANDOM_NUMBER_EXPECTED, "the peer sent a session-key random number unasked")


def _random_expected(transfer: Transfer, header: wire.Header, payload: bytes) -> list[Event]:
    raise RemoteProtocolError(
        ErrorCode.RANDOM_NUMBER_EXPECTED, "the peer sent a data block before the session-key random number"
    )


def _mac_without_message(transfer: Transfer, header: wire.Header, payload: bytes) -> list[Event]:
    raise RemoteProtocolError(ErrorCode.BAD_MAC, "the peer sent a MAC before the whole message: it was truncated")


_Handler = Callable[[Transfer, wire.Header, bytes], list[Event]]

TABLE: dict[tuple[Enum, MessageId], tuple[_Handler, Enum]] = {
    # the peer's messages
    (Inbound.IDLE, MessageId.MESSAGE_TRANSMISSION_RQ): (Transfer._on_request, Inbound.RECEIVING),
    (Inbound.AWAIT_RANDOM, MessageId.RNDNO_FOR_SESSION_KEY_RQ): (Transfer._on_random_request, Inbound.RECEIVING),
    (Inbound.RECEIVING, MessageId.MESSAGE_TRANSMISSION_NOTIF): (Transfer._on_block, Inbound.RECEIVING),
    (Inbound.RECEIVING, MessageId.MAC_TRANSMISSION_NOTIF): (Transfer._on_mac, Inbound.IDLE),
    (Inbound.AWAIT_RANDOM, MessageId.MESSAGE_TRANSMISSION_NOTIF): (_random_expected, Inbound.AWAIT_RANDOM),
    (Inbound.IDLE, MessageId.RNDNO_FOR_SESSION_KEY_RQ): (_unasked_random, Inbound.IDLE),
    (Inbound.HELD, MessageId.RNDNO_FOR_SESSION_KEY_RQ): (_unasked_random, Inbound.HELD),
    (Inbound.RECEIVING, MessageId.RNDNO_FOR_SESSION_KEY_RQ): (_unasked_random, Inbound.RECEIVING),
    (Inbound.IDLE, MessageId.MAC_TRANSMISSION_NOTIF): (_mac_without_message, Inbound.IDLE),
    (Inbound.HELD, MessageId.MAC_TRANSMISSION_NOTIF): (_mac_without_message, Inbound.HELD),
    (Inbound.AWAIT_RANDOM, MessageId.MAC_TRANSMISSION_NOTIF): (_mac_without_message, Inbound.AWAIT_RANDOM),
    # the answers to ours
    (Outbound.AWAIT_ANSWER, MessageId.MESSAGE_TRANSMISSION_RP): (Transfer._on_answer, Outbound.STREAMING),
    (Outbound.AWAIT_RANDOM_ANSWER, MessageId.RNDNO_FOR_SESSION_KEY_RP): (Transfer._on_random_answer, Outbound.STREAMING),
    # the link
    (State.READY, MessageId.THROUGH_MODE_TRANSMISSION_NOTIF): (Transfer._on_through, State.READY),
    (State.CLOSING, MessageId.THROUGH_MODE_TRANSMISSION_NOTIF): (Transfer._on_through, State.CLOSING),
    (State.READY, MessageId.LINE_DISCONNECTION_RQ): (Transfer._on_close_request, State.CLOSED),
    (State.CLOSING, MessageId.LINE_DISCONNECTION_RQ): (Transfer._on_close_request, State.CLOSING),
    (State.CLOSING, MessageId.LINE_DISCONNECTION_RP): (Transfer._on_close_answer, State.CLOSED),
}
"""(state of the message's machine, message) -> (handler, next state); anything else is refused on
its header (104). Handlers named with a leading underscore at module level refuse with their own code."""
