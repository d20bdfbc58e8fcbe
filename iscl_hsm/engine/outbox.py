"""Frames on their way to the peer, shared by the handshake and the transfer machine.

The profile's layout decides what a NAK carries (wire.Layout.err_no); the handshake also notes every
frame it sends in its transcript.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .. import wire
from ..errors import ErrorCode, KeyHolderError, RemoteProtocolError
from ..wire import MessageId


class Outbox:
    """Where a machine puts the frames it sends."""

    def __init__(self, layout: wire.Layout, frames: list[bytes], note: Callable[[bytes], object] = lambda frame: None) -> None:
        self.layout = layout
        self._frames = frames
        self._note = note

    def send(self, mid: MessageId, payload: bytes) -> None:
        self.put(wire.frame(mid, payload))

    def nak(self, mid: MessageId, payload: bytes, code: int) -> None:
        """``mid`` as a NAK refusing with ``code`` (in ErrNo too, where the profile puts it there)."""
        self.put(wire.frame(mid, payload, option=wire.NAK, err_no=self.layout.err_no(code)))

    def put(self, frames: bytes) -> None:
        """Frames made already (a batch of a message's blocks)."""
        self._note(frames)
        self._frames.append(frames)

    @contextmanager
    def telling_peer(self, mid: MessageId, nak_payload: bytes) -> Iterator[None]:
        """If the key holder fails inside, answer ``mid`` as NAK with code 103, then let the error go on."""
        try:
            yield
        except KeyHolderError:
            self.nak(mid, nak_payload, ErrorCode.REMOTE_KEY_HOLDER)
            raise

    def check_answer(self, header: wire.Header, status: int, what: str) -> None:
        """Raise the error a NAK (or a non-zero status) from the peer carries."""
        if header.option == wire.NAK or status != 0:
            code = self.layout.nak_code(header, status)
            known = ErrorCode(code) if code in ErrorCode._value2member_map_ else ErrorCode.RECEIVED_NAK
            raise RemoteProtocolError(known, f"the peer refused {what} (code {code}, {known.name})")
