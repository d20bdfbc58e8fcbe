"""The ISCL protocol engine: one link, either role, either profile, no I/O.

Theory of operation
-------------------
A :class:`Connection` is fed the bytes that arrive from the peer (:meth:`receive_data`) and returns
events; the bytes it wants sent are collected by :meth:`data_to_send`. It never touches a socket or a
clock. It calls its :class:`~iscl_hsm.keyholder.base.KeyHolder` for challenges, responses and keys,
so a transport runs engine calls off any event loop (see iscl_hsm.transport.aio, :attr:`may_block`).

It is a facade over two state machines, handed over the way wsproto hands its handshake to its
connection: a :class:`~iscl_hsm.engine.handshake.Handshake` (line connection and mutual
authentication) and, once both ends are authenticated, a :class:`~iscl_hsm.engine.transfer.Transfer`
(message transfer and line disconnection). Each has its own table of (state, message) -> (handler,
next state). What differs between the V1.00 and the hardened profile is a
:class:`~iscl_hsm.engine.profile.WireProfile` chosen from the Config, which both machines consult.

This module cuts the byte stream into messages. Every message's header is checked as soon as it is
in, before its payload is buffered: a known id, one the current machine takes in its state, a valid
Option, and a length within the limit for its kind, so garbage costs no memory. Anything the peer
does wrong raises :class:`RemoteProtocolError` and the link is dead: send what :meth:`data_to_send`
still returns (it may hold a NAK that tells the peer why), then close the socket.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable
from contextlib import suppress

from .. import wire
from ..errors import ErrorCode, IsclError, KeyHolderError, LocalProtocolError, RemoteProtocolError
from ..keyholder.base import KeyHolder
from ..wire import MessageId
from .config import Config, Role
from .events import Event, LinkParameters
from .handshake import DEFAULT_GUARD, ChallengeGuard, Handshake
from .profile import WireProfile, profile_for, suite_of
from .record import Opener
from .state import HANDSHAKE_STATES, Inbound, Outbound, State, Waiting
from .transfer import Transfer

_BLOCK_HEAD = struct.Struct(">4xIII")
"""MessageId, DataLength and Option of a header, for the data-block fast path."""


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
        self._config = config or Config()
        self.profile: WireProfile = profile_for(self._config)
        self.profile.check_key_holder(self._config, key_holder)
        self._random = random
        self._inbuf = bytearray()
        self._out: list[bytes] = []  # frames for the peer, joined by data_to_send()
        self._handshake = Handshake(role, key_holder, self._config, self.profile, guard, self._out)
        self._transfer: Transfer | None = None
        self._failed = False
        self.parameters: LinkParameters | None = None

    # --- state --------------------------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        """Change what can change on a live link (``accept_close``, limits); not its profile or suite."""
        if (config.profile, suite_of(config)) != (self._config.profile, suite_of(self._config)):
            raise LocalProtocolError(ErrorCode.BAD_STATE, "a link's profile and algorithms cannot change once it is made")
        self._config = self._handshake.config = config
        if self._transfer is not None:
            self._transfer.config = config

    @property
    def state(self) -> State:
        if self._failed:
            return State.ERROR
        return self._transfer.state if self._transfer is not None else self._handshake.state

    @property
    def outbound(self) -> Outbound | None:
        """Where our current message is, once the link is up (None before)."""
        return self._transfer.outbound if self._transfer is not None else None

    @property
    def inbound(self) -> Inbound | None:
        """Where the peer's current message is, once the link is up (None before)."""
        return self._transfer.inbound if self._transfer is not None else None

    @property
    def block_length(self) -> int:
        """The negotiated communication block length (0 before line connection)."""
        return self._handshake.block_length

    @property
    def idle(self) -> bool:
        """True when nothing is queued, in flight or half received."""
        return self._transfer is None or self._transfer.idle

    @property
    def waiting(self) -> Waiting:
        """What this end waits for from the peer: which of its timeouts a transport applies to the next read."""
        if self._failed:
            return Waiting.NOTHING
        if self._transfer is None:
            return Waiting.HANDSHAKE
        return self._transfer.waiting

    @property
    def peer_request(self) -> wire.TransmissionRq | None:
        """The last message request the peer made that we refused (GetPeer...ISCL in the SDK)."""
        return self._transfer.peer_request if self._transfer is not None else None

    @property
    def may_block(self) -> bool:
        """True when the next call may wait on the key holder; a transport then makes it off its loop.

        Once the link is up, only unique session keys, record keys kept in a token or card, and keys
        not fetched or derived yet (``prepare()`` does that) need the key holder.
        """
        if self._failed:
            return False
        if self._transfer is not None:
            return self._transfer.may_block
        return self._handshake.may_block

    @property
    def _machine(self) -> Handshake | Transfer:
        return self._transfer if self._transfer is not None else self._handshake

    # --- public API ---------------------------------------------------------------------------

    def initiate(self) -> None:
        """Server only: start the line connection protocol."""
        self._handshake.initiate()

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer (``b""`` at end of stream); return what happened."""
        if self._failed:
            raise LocalProtocolError(ErrorCode.BAD_STATE, "the link has already failed")
        if not data:
            return self._end_of_stream()
        self._inbuf += data
        events: list[Event] = []
        try:
            while True:
                opener = self._transfer.receiving if self._transfer is not None else None
                if opener is not None and not opener.complete:
                    self._take_blocks(opener)
                message = self._next_message()
                if message is None:
                    return events
                header, payload, frame = message
                events.extend(self._dispatch(header, payload, frame))
        except IsclError as exc:
            self._fail()
            exc.events = events  # what happened before the failure, e.g. messages already verified
            raise

    def data_to_send(self) -> bytes:
        """Bytes for the peer: control messages first, then the next blocks of an outgoing message."""
        if self._transfer is not None and not self._failed:
            self._transfer.produce()
        out = b"".join(self._out)
        self._out.clear()
        return out

    def send_message(self, data: bytes) -> None:
        """Queue a secured message; it goes out when the peer accepts its request."""
        self._ready_transfer("send a message").send_message(data)

    def send_non_secure(self, data: bytes) -> None:
        """Send unprotected data in through mode (the peer must have enabled it too)."""
        self._ready_transfer("send a non-secure message").send_non_secure(data)

    def close(self) -> None:
        """Start line disconnection once every queued message has gone out."""
        self._ready_transfer("close the line").close()

    def prepare(self) -> None:
        """Do work that can wait until the output is on its way: keys ahead of need, sealing ahead.

        Transports call this after sending :meth:`data_to_send`, before waiting for the peer, so a
        key holder's slow work (and the sealing of a requested message) overlaps with the peer's
        own. Never required: whatever it does would otherwise happen when first needed, so a key
        holder's failure here is left for that moment, where the engine tells the peer why (NAK 103)
        before the link drops.
        """
        if self._failed:
            return
        machine = self._machine
        work, machine.deferred = machine.deferred, None
        if work is not None:
            with suppress(KeyHolderError):
                work()
        if self._transfer is not None:
            self._transfer.begin_sealing_ahead()

    def seal_ahead(self) -> bool:
        """Seal more of the requested message while the peer has yet to accept it; False if nothing was.

        See :meth:`Transfer.seal_ahead <iscl_hsm.engine.transfer.Transfer.seal_ahead>`.
        """
        if self._failed or self._transfer is None:
            return False
        return self._transfer.seal_ahead()

    # --- internals ----------------------------------------------------------------------------

    def _ready_transfer(self, what: str) -> Transfer:
        if self._transfer is None or self._failed:
            raise LocalProtocolError(ErrorCode.BAD_STATE, f"cannot {what}: the link is {self.state.name.lower()}")
        return self._transfer

    def _fail(self) -> None:
        self._failed = True
        self._handshake.fail()

    def _next_message(self) -> tuple[wire.Header, bytes, bytes] | None:
        if len(self._inbuf) < wire.HEADER_SIZE:
            return None
        header = wire.Header.decode(memoryview(self._inbuf)[: wire.HEADER_SIZE])
        mid = self._check_header(header)
        end = wire.HEADER_SIZE + header.data_length
        if len(self._inbuf) < end:
            return None
        with memoryview(self._inbuf) as view:
            payload = bytes(view[wire.HEADER_SIZE : end])
            frame = bytes(view[:end]) if self._transfer is None else b""  # the handshake keeps a transcript
        del self._inbuf[:end]
        return wire.Header(mid, header.data_length, header.option, header.err_no), payload, frame

    def _take_blocks(self, opener: Opener) -> None:
        """Fast path for the bulk of all traffic: consecutive data blocks of an accepted message.

        Only well-formed MESSAGE_TRANSMISSION_NOTIFs are taken here, without building Header
        objects; anything else is left to _next_message and its full checks.
        """
        buf, pos, limit = self._inbuf, 0, self.block_length
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
        machine = self._machine
        if not machine.accepts(mid):
            raise RemoteProtocolError(
                ErrorCode.BAD_MESSAGE_ID, f"the peer sent {mid.name} while this end was in state {self._describe()}"
            )
        if header.option not in (wire.ACK, wire.NAK):
            raise RemoteProtocolError(ErrorCode.BAD_OPTION, f"the peer sent option 0x{header.option:08X} in {mid.name}")
        machine.check_header(mid, header.data_length)
        return mid

    def _describe(self) -> str:
        if self._transfer is None:
            return self._handshake.state.name
        t = self._transfer
        return f"{t.state.name} (our message {t.outbound.name}, the peer's {t.inbound.name})"

    def _dispatch(self, header: wire.Header, payload: bytes, frame: bytes) -> list[Event]:
        if self._transfer is not None:
            return self._transfer.handle(header, payload)
        events = self._handshake.handle(header, payload, frame)
        if (handoff := self._handshake.result) is not None:
            self.parameters = handoff.parameters
            self._transfer = Transfer(self.role, self._config, self.profile, handoff, self._out, self._random)
            self._transfer.deferred, self._handshake.deferred = self._handshake.deferred, None
        return events

    def _end_of_stream(self) -> list[Event]:
        state = self.state
        if state is State.CLOSED:
            return []
        self._fail()
        if state in HANDSHAKE_STATES:
            where = f"during the handshake ({state.name}); {self._handshake.profile_hint()}"
        else:
            where = "in the middle of a message" if not self.idle or self._inbuf else "without disconnecting"
        raise RemoteProtocolError(ErrorCode.CONNECTION_LOST, f"the peer closed the connection {where}")
