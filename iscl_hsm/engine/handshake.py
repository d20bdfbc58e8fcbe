"""Line connection and mutual authentication: the first two ISCL protocols, as one state machine.

Theory of operation
-------------------
The handshake runs the line connection protocol and the three-pass-four-way authentication::

    line connection   server: LINE_CONNECTION_CHECK_RQ (max block, version)
                      client: LINE_CONNECTION_CHECK_RP (status, min(client, server) block)
    authentication    client: MUTUAL_AUTH_RQ (method, key-pair id N[, auth data])
                      server: MUTUAL_AUTH_RP (status[, auth data]), PASS1 (RS = GET CHALLENGE)
                      client: PASS2 (E_K(RS) = INTERNAL AUTHENTICATE, RC = GET CHALLENGE)
                      server: EXTERNAL AUTHENTICATE of E_K(RS); PASS3 (E_K(RC)[, handshake MAC])
                      client: EXTERNAL AUTHENTICATE of E_K(RC)[, checks the MAC];
                              COMPLETION (result[, handshake MAC]) -> both ends are ready.

:data:`TABLE` maps (state, message) to (handler, next state), h2-style: the next state is entered,
then the handler runs; a handler that raises kills the link. A pair not in the table is refused on
the message's header (104). What the bracketed parts hold comes from the profile (V1.00: nothing,
hardened: transcript MACs); the handlers never ask which profile it is. When both ends are ready
:attr:`Handshake.result` holds what the transfer machine needs (iscl_hsm.engine.transfer).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from .. import wire
from ..errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from ..keyholder.base import KEY_INDEXES, KeyHolder
from ..wire import CLIENT_LABEL, SERVER_LABEL, MessageId
from .config import Config, Role
from .events import Event, LinkParameters, LinkReady
from .outbox import Outbox
from .profile import LinkKeys, WireProfile
from .record import same
from .state import State


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

KEY_HOLDER_STATES = frozenset(
    {
        State.SERVER_WAIT_LINE_RP,  # the client sends AUTH_RQ right behind LINE_RP
        State.SERVER_WAIT_AUTH_RQ,  # GET CHALLENGE
        State.SERVER_WAIT_PASS2,  # EXTERNAL and INTERNAL AUTHENTICATE, keys
        State.CLIENT_WAIT_AUTH_RP,  # the server sends PASS1 right behind AUTH_RP
        State.CLIENT_WAIT_PASS1,  # INTERNAL AUTHENTICATE, GET CHALLENGE
        State.CLIENT_WAIT_PASS3,  # EXTERNAL AUTHENTICATE, keys, the handshake MACs
    }
)
"""States in which the bytes received next may hold a message that makes key-holder calls (one read
often returns two messages the peer sent together). SERVER_WAIT_COMPLETION is one of them only while
the profile's keys still need the key holder (LinkKeys.completion_on_host)."""


@dataclass(frozen=True)
class Handoff:
    """What an authenticated link hands to the transfer machine."""

    parameters: LinkParameters
    keys: LinkKeys


class Handshake:
    """One end of the line connection and mutual authentication protocols."""

    def __init__(
        self,
        role: Role,
        holder: KeyHolder,
        config: Config,
        profile: WireProfile,
        guard: ChallengeGuard,
        out: list[bytes],
    ) -> None:
        self.role = role
        self.state = State.SERVER_START if role is Role.SERVER else State.CLIENT_WAIT_LINE_RQ
        self.block_length = 0
        self.result: Handoff | None = None
        self.deferred: Callable[[], object] | None = None
        """Key-holder work that can wait until the output is on its way (Connection.prepare)."""
        self._holder = holder
        self.config = config
        self._profile = profile
        self._layout = profile.layout
        self._guard = guard
        self._transcript = profile.transcript()
        self._outbox = Outbox(self._layout, out, self._transcript.sent)
        self._pair_id = config.auth_key_id
        self._peer_auth_data = b""
        self._rs = b""
        self._rc = b""
        self._keys: LinkKeys | None = None

    # --- what the connection asks -------------------------------------------------------------

    def accepts(self, mid: MessageId) -> bool:
        return (self.state, mid) in TABLE

    def check_header(self, mid: MessageId, length: int) -> None:
        """Refuse, before its payload is read, a handshake message longer than any can be."""
        if length > wire.CONTROL_LIMIT:
            raise RemoteProtocolError(
                ErrorCode.BAD_LENGTH,
                f"the peer announced {length} bytes of {mid.name}; at most {wire.CONTROL_LIMIT} are allowed",
            )

    def handle(self, header: wire.Header, payload: bytes, frame: bytes) -> list[Event]:
        mid = MessageId(header.message_id)
        handler, self.state = TABLE[self.state, mid]
        self._transcript.received(frame)
        try:
            return handler(self, header, payload)
        except RemoteProtocolError as exc:
            if exc.code is ErrorCode.BAD_LENGTH and mid in _PROFILE_SHAPED:
                raise RemoteProtocolError(exc.code, f"{exc.args[0]}; {self.profile_hint()}") from None
            raise

    def profile_hint(self) -> str:
        """The likely cause of a handshake that fails on the shape of a message."""
        return (
            f"is the peer using the other profile? This end uses {self._profile.profile.value}, and both ends"
            " must choose the same profile (--profile)"
        )

    @property
    def may_block(self) -> bool:
        if self.deferred is not None or self.state in KEY_HOLDER_STATES:
            return True
        if self.state is State.SERVER_WAIT_COMPLETION:
            assert self._keys is not None
            return not self._keys.completion_on_host()
        return False

    def initiate(self) -> None:
        """Server only: start the line connection protocol."""
        if self.state is not State.SERVER_START:
            raise LocalProtocolError(ErrorCode.BAD_STATE, "initiate() is for a new server connection")
        self._outbox.send(MessageId.LINE_CONNECTION_CHECK_RQ, wire.LineConnectionRq(self.config.max_block).encode())
        self.state = State.SERVER_WAIT_LINE_RP

    def fail(self) -> None:
        """The link is dead: forget the challenge we issued, so the guard does not grow without bound."""
        if self._rs and self.role is Role.SERVER:
            self._guard.release(Role.SERVER, self._rs)
        if self._rc and self.role is Role.CLIENT:
            self._guard.release(Role.CLIENT, self._rc)

    def _refused_auth(self, reply: MessageId, nak: bytes, error: RemoteProtocolError) -> RemoteProtocolError:
        """An authentication check failed: with a uniform-failure profile the peer hears the same NAK
        (120) whatever failed; the local error keeps the reason."""
        if self._profile.uniform_auth_failure:
            self._outbox.nak(reply, nak, ErrorCode.AUTHENTICATION_FAILED)
        return error

    def _pass2_nak(self, code: int) -> bytes:
        return wire.Pass2(code, bytes(8), bytes(8)).encode()

    def _pass3_nak(self, code: int) -> bytes:
        return wire.Pass3(code, bytes(8), 0, bytes(self._layout.finished_size)).encode()

    def _completion_nak(self, code: int) -> bytes:
        return wire.Completion(code, bytes(self._layout.finished_size)).encode()

    # --- line connection ----------------------------------------------------------------------

    def _on_line_rq(self, header: wire.Header, payload: bytes) -> list[Event]:
        rq = wire.LineConnectionRq.decode(payload)
        if rq.version != wire.VERSION:
            code = ErrorCode.BAD_VERSION
            self._outbox.nak(MessageId.LINE_CONNECTION_CHECK_RP, wire.LineConnectionRp(code, 0).encode(), code)
            raise RemoteProtocolError(code, f"the server speaks {rq.version!r}, not {wire.VERSION.decode()}")
        block = min(self.config.max_block, rq.max_block) // 8 * 8
        if block < wire.MIN_BLOCK:
            raise RemoteProtocolError(
                ErrorCode.BAD_BLOCK_LENGTH, f"the server offered a block length of {rq.max_block} bytes"
            )
        self.block_length = block
        self._outbox.send(MessageId.LINE_CONNECTION_CHECK_RP, wire.LineConnectionRp(0, block).encode())
        rq_auth = wire.MutualAuthRq(wire.AuthMethod.THREE_PASS_FOUR_WAY, self._pair_id, self.config.own_auth_data)
        self._outbox.send(MessageId.MUTUAL_AUTH_RQ, rq_auth.encode(self._layout))
        return []

    def _on_line_rp(self, header: wire.Header, payload: bytes) -> list[Event]:
        rp = wire.LineConnectionRp.decode(payload)
        self._outbox.check_answer(header, rp.status, "line connection")
        if not (wire.MIN_BLOCK <= rp.block_length <= self.config.max_block and rp.block_length % 8 == 0):
            raise RemoteProtocolError(
                ErrorCode.BAD_BLOCK_LENGTH,
                f"the client chose a block length of {rp.block_length} bytes; this server allows a"
                f" multiple of 8 between {wire.MIN_BLOCK} and {self.config.max_block}",
            )
        self.block_length = rp.block_length
        return []

    # --- mutual authentication ----------------------------------------------------------------

    def _on_auth_rq(self, header: wire.Header, payload: bytes) -> list[Event]:
        rq = wire.MutualAuthRq.decode(payload, self._layout)
        if rq.method != wire.AuthMethod.THREE_PASS_FOUR_WAY:
            self._refuse_auth(ErrorCode.BAD_AUTH_METHOD, f"the client asked for authentication method {rq.method}")
        if rq.key_id not in KEY_INDEXES or rq.key_id not in self.config.allowed_auth_key_ids:
            self._refuse_auth(
                ErrorCode.BAD_OPTION,
                f"the client asked for authentication key {rq.key_id}, which this server does not allow",
            )
        self._check_auth_data(rq.auth_data, "client", refuse=True)
        self._pair_id = rq.key_id
        self._peer_auth_data = rq.auth_data
        failed = wire.MutualAuthRp(ErrorCode.REMOTE_KEY_HOLDER).encode(self._layout)
        with self._outbox.telling_peer(MessageId.MUTUAL_AUTH_RP, failed):
            self._rs = self._holder.get_challenge(self._pair_id)
        self._guard.issue(Role.SERVER, self._rs)
        self._keys = self._profile.link_keys(self._holder, self.config, self._pair_id, self._rs, client=False)
        self._outbox.send(MessageId.MUTUAL_AUTH_RP, wire.MutualAuthRp(0, self.config.own_auth_data).encode(self._layout))
        self._outbox.send(MessageId.MUTUAL_AUTH_PASS1_NOTIF, wire.Pass1(0, self._rs).encode())
        self.deferred = self._work_ahead  # while the client works on pass 1
        return []

    def _check_auth_data(self, data: bytes, who: str, *, refuse: bool) -> None:
        least = 1 if self._layout.auth_data_always_counted else 0
        if least <= len(data) <= wire.MAX_AUTH_DATA:
            return
        why = f"the {who} sent {len(data)} bytes of authentication data; {least}..{wire.MAX_AUTH_DATA} are allowed"
        if refuse:
            self._refuse_auth(ErrorCode.BAD_LENGTH, why)
        raise RemoteProtocolError(ErrorCode.BAD_LENGTH, why)

    def _refuse_auth(self, code: ErrorCode, why: str) -> None:
        self._outbox.nak(MessageId.MUTUAL_AUTH_RP, wire.MutualAuthRp(code).encode(self._layout), code)
        raise RemoteProtocolError(code, why)

    def _on_auth_rp(self, header: wire.Header, payload: bytes) -> list[Event]:
        rp = wire.MutualAuthRp.decode(payload, self._layout)
        self._outbox.check_answer(header, rp.status, "mutual authentication")
        self._check_auth_data(rp.auth_data, "server", refuse=False)
        self._peer_auth_data = rp.auth_data
        return []

    def _on_pass1(self, header: wire.Header, payload: bytes) -> list[Event]:
        p1 = wire.Pass1.decode(payload)
        self._outbox.check_answer(header, p1.status, "authentication pass 1")
        if self._guard.is_ours(Role.CLIENT, p1.challenge):
            raise self._refused_auth(
                MessageId.MUTUAL_AUTH_PASS2_NOTIF,
                self._pass2_nak(ErrorCode.AUTHENTICATION_FAILED),
                RemoteProtocolError(
                    ErrorCode.REFLECTED_CHALLENGE,
                    "the server sent a challenge that one of this process's clients issued: a reflection"
                    " attack; the link was dropped",
                ),
            )
        self._rs = p1.challenge
        with self._outbox.telling_peer(MessageId.MUTUAL_AUTH_PASS2_NOTIF, self._pass2_nak(ErrorCode.REMOTE_KEY_HOLDER)):
            response = self._holder.internal_authenticate(self._pair_id, self._rs)
            self._rc = self._holder.get_challenge(self._pair_id)
        self._guard.issue(Role.CLIENT, self._rc)
        self._outbox.send(MessageId.MUTUAL_AUTH_PASS2_NOTIF, wire.Pass2(0, response, self._rc).encode())
        self._keys = self._profile.link_keys(self._holder, self.config, self._pair_id, self._rs, client=True)
        self._keys.client_challenge(self._rc)
        self.deferred = self._work_ahead  # while the server works on pass 2
        return []

    def _on_pass2(self, header: wire.Header, payload: bytes) -> list[Event]:
        p2 = wire.Pass2.decode(payload)
        keys = self._keys
        assert keys is not None
        self._guard.release(Role.SERVER, self._rs)
        if header.option == wire.NAK or p2.status != 0:
            code = self._layout.nak_code(header, p2.status)
            if code == ErrorCode.AUTHENTICATION_FAILED:
                raise RemoteProtocolError(ErrorCode.AUTHENTICATION_FAILED, "the client refused our authentication")
            raise RemoteProtocolError(
                ErrorCode.REMOTE_KEY_HOLDER,
                f"the client's key holder failed to answer our challenge (status {p2.status})",
            )
        failed = self._pass3_nak(ErrorCode.REMOTE_KEY_HOLDER)
        with self._outbox.telling_peer(MessageId.MUTUAL_AUTH_PASS3_NOTIF, failed):
            verified = self._holder.external_authenticate(self._pair_id, self._rs, p2.response)
        if not verified:
            code = ErrorCode.AUTHENTICATION_FAILED
            self._outbox.nak(MessageId.MUTUAL_AUTH_PASS3_NOTIF, self._pass3_nak(code), code)
            raise RemoteProtocolError(
                code,
                f"the client's response does not match authentication key {self._pair_id}:"
                " the two ends hold different keys at that index",
            )
        if p2.challenge == self._rs or self._guard.is_ours(Role.SERVER, p2.challenge):
            raise self._refused_auth(
                MessageId.MUTUAL_AUTH_PASS3_NOTIF,
                self._pass3_nak(ErrorCode.AUTHENTICATION_FAILED),
                RemoteProtocolError(
                    ErrorCode.REFLECTED_CHALLENGE, "the client sent back a challenge this server issued"
                ),
            )
        self._rc = p2.challenge
        keys.client_challenge(self._rc)
        with self._outbox.telling_peer(MessageId.MUTUAL_AUTH_PASS3_NOTIF, failed):
            response = self._holder.internal_authenticate(self._pair_id, self._rc)
            keys.require()
            finished = keys.proof(SERVER_LABEL, self._transcript.digest())
        self._outbox.send(MessageId.MUTUAL_AUTH_PASS3_NOTIF, wire.Pass3(0, response, 0, finished).encode())
        self.deferred = keys.ahead  # while the client works on pass 3
        return []

    def _on_pass3(self, header: wire.Header, payload: bytes) -> list[Event]:
        # The transcript already holds PASS3; the server's MAC covers what came before it.
        p3 = wire.Pass3.decode(payload, self._layout)
        keys = self._keys
        assert keys is not None
        self._guard.release(Role.CLIENT, self._rc)
        if header.option == wire.NAK or p3.status != 0:
            code = self._layout.nak_code(header, p3.status)
            raise RemoteProtocolError(
                ErrorCode.REMOTE_KEY_HOLDER if code == ErrorCode.REMOTE_KEY_HOLDER else ErrorCode.AUTHENTICATION_FAILED,
                "the server's key holder failed (see the server's log)"
                if code == ErrorCode.REMOTE_KEY_HOLDER
                else "the server rejected our response to its challenge: the two ends hold different"
                f" keys at authentication index {self._pair_id} (status {code})",
            )
        with self._outbox.telling_peer(MessageId.MUTUAL_AUTH_COMPLETION_NOTIF, self._completion_nak(ErrorCode.REMOTE_KEY_HOLDER)):
            verified = self._holder.external_authenticate(self._pair_id, self._rc, p3.response)
            keys.require()
            expected = keys.proof(SERVER_LABEL, self._transcript.digest(before_last_received=True))
        refusal = MessageId.MUTUAL_AUTH_COMPLETION_NOTIF, self._completion_nak(ErrorCode.AUTHENTICATION_FAILED)
        if not verified:
            raise self._refused_auth(
                *refusal,
                RemoteProtocolError(
                    ErrorCode.AUTHENTICATION_FAILED,
                    f"the server's response does not match authentication key {self._pair_id}",
                ),
            )
        if not same(expected, p3.finished):
            raise self._refused_auth(*refusal, _handshake_mac_mismatch("server", self._pair_id))
        finished = keys.proof(CLIENT_LABEL, self._transcript.digest())
        self._outbox.send(MessageId.MUTUAL_AUTH_COMPLETION_NOTIF, wire.Completion(0, finished).encode())
        return [self._ready(keys)]

    def _on_completion(self, header: wire.Header, payload: bytes) -> list[Event]:
        done = wire.Completion.decode(payload, self._layout)
        keys = self._keys
        assert keys is not None
        if header.option == wire.NAK or done.result != 0:
            if done.result == ErrorCode.REMOTE_KEY_HOLDER:
                raise RemoteProtocolError(ErrorCode.REMOTE_KEY_HOLDER, "the client's key holder failed")
            raise RemoteProtocolError(
                ErrorCode.AUTHENTICATION_FAILED, f"the client reported authentication result {done.result}"
            )
        expected = keys.proof(CLIENT_LABEL, self._transcript.digest(before_last_received=True))
        if not same(expected, done.finished):
            raise _handshake_mac_mismatch("client", self._pair_id)
        return [self._ready(keys)]

    def _work_ahead(self) -> None:
        """While the peer answers our challenge: the response we expect, then whatever keys can be had."""
        assert self._keys is not None
        own = self._rs if self.role is Role.SERVER else self._rc
        self._holder.expect_response(self._pair_id, own)
        self._keys.ahead()

    def _ready(self, keys: LinkKeys) -> LinkReady:
        if keys.ahead_pending():
            self.deferred = keys.ahead  # (if prepare() has not run since the last pass)
        parameters = LinkParameters(
            version=wire.VERSION.decode(),
            block_length=self.block_length,
            auth_key_id=self._pair_id,
            enc_key_id=self.config.enc_key_id,
            encryption=self.config.encryption,
            mac=self.config.mac,
            peer_auth_data=self._peer_auth_data,
            profile=self._profile.profile,
        )
        self.result = Handoff(parameters, keys)
        return LinkReady(parameters)


def _handshake_mac_mismatch(peer: str, pair_id: int) -> RemoteProtocolError:
    """The handshake MAC (hardened) failed. Its key derives from encryption key N of the key pair, so
    different enc-N keys at the two sites look exactly like an altered handshake; the first is the
    likely cause (a key ceremony gone wrong), so it comes first."""
    return RemoteProtocolError(
        ErrorCode.AUTHENTICATION_FAILED,
        f"the {peer}'s handshake MAC does not match: the two sites hold different encryption keys"
        f" iscl-enc-{pair_id} (compare their KCVs with `iscl keys check`), or the handshake was altered"
        " in transit",
    )


_PROFILE_SHAPED = frozenset(
    {
        MessageId.MUTUAL_AUTH_RQ,
        MessageId.MUTUAL_AUTH_RP,
        MessageId.MUTUAL_AUTH_PASS3_NOTIF,
        MessageId.MUTUAL_AUTH_COMPLETION_NOTIF,
    }
)
"""Messages whose payload size differs between the profiles (wire.Layout)."""

_Handler = Callable[[Handshake, wire.Header, bytes], list[Event]]

TABLE: dict[tuple[State, MessageId], tuple[_Handler, State]] = {
    (State.CLIENT_WAIT_LINE_RQ, MessageId.LINE_CONNECTION_CHECK_RQ): (Handshake._on_line_rq, State.CLIENT_WAIT_AUTH_RP),
    (State.SERVER_WAIT_LINE_RP, MessageId.LINE_CONNECTION_CHECK_RP): (Handshake._on_line_rp, State.SERVER_WAIT_AUTH_RQ),
    (State.SERVER_WAIT_AUTH_RQ, MessageId.MUTUAL_AUTH_RQ): (Handshake._on_auth_rq, State.SERVER_WAIT_PASS2),
    (State.CLIENT_WAIT_AUTH_RP, MessageId.MUTUAL_AUTH_RP): (Handshake._on_auth_rp, State.CLIENT_WAIT_PASS1),
    (State.CLIENT_WAIT_PASS1, MessageId.MUTUAL_AUTH_PASS1_NOTIF): (Handshake._on_pass1, State.CLIENT_WAIT_PASS3),
    (State.SERVER_WAIT_PASS2, MessageId.MUTUAL_AUTH_PASS2_NOTIF): (Handshake._on_pass2, State.SERVER_WAIT_COMPLETION),
    (State.CLIENT_WAIT_PASS3, MessageId.MUTUAL_AUTH_PASS3_NOTIF): (Handshake._on_pass3, State.READY),
    (State.SERVER_WAIT_COMPLETION, MessageId.MUTUAL_AUTH_COMPLETION_NOTIF): (Handshake._on_completion, State.READY),
}
"""(state, message) -> (handler, next state); anything else is refused on its header (104)."""
