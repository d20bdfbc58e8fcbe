"""One fault, at one frame of one direction of a link, applied by the man in the middle (../proxy.py).

A :class:`Fault` names a kind, a direction ("c2s" or "s2c") and a position (the index of the frame
among that direction's frames on the link, handshake included, from 0). :class:`FaultHandler`
forwards every other frame untouched. The kinds are the seven faults of issue 17, two of them in
two variants: a bit flipped in the header or in the payload, the connection cut after the frame or
in its middle. Every choice that could vary (which bit, how long a delay) is a function of the
fault alone, so a case is the same on every run; only the ends' own timing varies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from iscl_hsm.engine import Profile
from iscl_hsm.wire import MessageId

from ..conftest import header
from ..proxy import Handler, Link, Seen


class Kind(Enum):
    FLIP_HEADER = "flip-header"
    FLIP_PAYLOAD = "flip-payload"
    DROP = "drop"
    REPLAY = "replay"
    SWAP = "swap"
    CUT_AFTER = "cut-after"
    CUT_INSIDE = "cut-inside"
    DELAY = "delay"
    INJECT = "inject"


FAULTS: dict[str, tuple[Kind, ...]] = {
    "flip": (Kind.FLIP_HEADER, Kind.FLIP_PAYLOAD),
    "drop": (Kind.DROP,),
    "replay": (Kind.REPLAY,),
    "swap": (Kind.SWAP,),
    "cut": (Kind.CUT_AFTER, Kind.CUT_INSIDE),
    "delay": (Kind.DELAY,),
    "inject": (Kind.INJECT,),
}
"""The seven faults of issue 17 and their variants (nine kinds in all)."""

HEADER_FIELDS = ("MessageId", "DataLength", "Option", "TimeStamp")
"""The header fields a header flip rotates through (by position): three that every receiver checks
and one it ignores (docs/protocol.md §1, "The header")."""
_FIELD_OFFSET = {"Indicator": 0, "MessageId": 4, "DataLength": 8, "Option": 12, "TimeStamp": 16}
IGNORED_FIELDS = frozenset({"Indicator", "TimeStamp"})


@dataclass(frozen=True)
class Fault:
    """``kind`` at frame ``position`` of ``direction``; ``delay`` seconds for Kind.DELAY."""

    kind: Kind
    direction: str
    position: int
    delay: float = 0.0

    def __str__(self) -> str:
        return f"{self.kind.value}-{self.direction}-{self.position}"

    @property
    def header_field(self) -> str:
        """The header field a flip changes: FLIP_HEADER's by rotation, and a payload flip's on a
        frame without a payload (there is nothing else to flip)."""
        return HEADER_FIELDS[self.position % len(HEADER_FIELDS)]

    @property
    def bit(self) -> int:
        return self.position % 8


def flipped(fault: Fault, raw: bytes) -> tuple[bytes, int | None]:
    """The frame with one bit inverted, and the payload offset of that bit (None: in the header).

    A payload flip changes bit ``fault.bit`` of the middle byte: in the CLI sessions' messages (64 and
    40 bytes, cli.py) both the block it lands in and the next one hold message data, never padding,
    so what CBC makes of an undetected flip is exactly predictable (oracle.Change). A header flip
    changes the low bit of ``fault.header_field``.
    """
    out = bytearray(raw)
    payload = len(raw) - 32
    if fault.kind is Kind.FLIP_PAYLOAD and payload > 0:
        offset = payload // 2
        out[32 + offset] ^= 1 << fault.bit
        return bytes(out), offset
    out[_FIELD_OFFSET[fault.header_field] + 3] ^= 1
    return bytes(out), None


def middle(raw: bytes) -> int:
    """Where CUT_INSIDE cuts a frame: half way through its payload, or through its header if it has none."""
    payload = len(raw) - 32
    return 32 + payload // 2 if payload else 16


def disconnection_request(profile: Profile) -> bytes:
    """A forged LINE_DISCONNECTION_RQ: empty in V1.00 (all it is there), 8 zero bytes where hardened
    wants its MAC (docs/protocol.md §11)."""
    payload = b"" if profile is Profile.V100 else bytes(8)
    return header(MessageId.LINE_DISCONNECTION_RQ, len(payload)) + payload


@dataclass
class FaultHandler(Handler):
    """Applies ``fault`` to one link; forwards everything else as it came.

    ``hit`` is the frame the fault met (None: the direction never had that many frames);
    ``payload_offset`` where a payload flip landed. A replayed copy, or a frame held for a swap, goes
    after the next frame of its direction, or just before its end of stream if none follows.
    """

    fault: Fault
    profile: Profile
    hit: Seen | None = None
    payload_offset: int | None = None
    later: list[bytes] = field(default_factory=list)
    """What goes after the next frame: a held frame (swap) or a copy (replay)."""

    def frame(self, link: Link, seen: Seen) -> None:
        fault = self.fault
        if seen.direction != fault.direction:
            link.send(seen.direction, seen.frame.raw)
            return
        if seen.index != fault.position:
            link.send(seen.direction, seen.frame.raw)
            self._release(link)
            return
        self.hit = seen
        raw = seen.frame.raw
        kind = fault.kind
        if kind in (Kind.FLIP_HEADER, Kind.FLIP_PAYLOAD):
            changed, self.payload_offset = flipped(fault, raw)
            link.send(fault.direction, changed)
        elif kind is Kind.DROP:
            pass
        elif kind is Kind.REPLAY:
            link.send(fault.direction, raw)
            self.later.append(raw)
        elif kind is Kind.SWAP:
            self.later.append(raw)
        elif kind is Kind.CUT_AFTER:
            link.send(fault.direction, raw)
            link.cut()
        elif kind is Kind.CUT_INSIDE:
            link.send(fault.direction, raw[: middle(raw)])
            link.cut()
        elif kind is Kind.DELAY:
            time.sleep(fault.delay)  # this direction stalls; the other runs on
            link.send(fault.direction, raw)
        elif kind is Kind.INJECT:
            link.send(fault.direction, raw)
            link.send(fault.direction, disconnection_request(self.profile))

    def _release(self, link: Link) -> None:
        for raw in self.later:
            link.send(self.fault.direction, raw)
        self.later.clear()

    def end(self, link: Link, direction: str, rest: bytes) -> None:
        if direction == self.fault.direction:
            self._release(link)
        link.send(direction, rest)
