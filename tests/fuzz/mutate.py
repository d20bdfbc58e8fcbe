"""Mutations of recorded sessions, all drawn from one seeded ``random.Random`` (an input is its seed).

Two levels, because the engine parses at two: whole frames (dropped, duplicated, reordered,
replayed, spliced in from another link, whole messages transplanted, the link cut off) test the
state machines, and edits inside a frame
(a header field, a payload word, a bit, bytes inserted or removed, a length far past every limit)
test the parser. A byte-level edit of the joined stream then breaks frame boundaries, and the
chunking decides how the bytes reach ``receive_data``: whole, frame by frame, or cut anywhere,
down to one byte per call, since a header split across calls is a classic place for a parser to slip.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from random import Random

from iscl_hsm import wire
from iscl_hsm.engine import Role
from iscl_hsm.errors import ErrorCode
from iscl_hsm.wire import HEADER_SIZE, Encryption, Mac, MessageId
from tests.helpers import Frame

from .corpus import BLOCK, MAX_MESSAGE, Act, Step

_U32 = struct.Struct(">I")

INTERESTING = sorted(
    {0, 1, 2, 3, 4, 7, 8, 9, 12, 15, 16, 17, 24, 31, 32, 33, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF,
     0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF, wire.SESSION_KEYS, wire.NAK,
     BLOCK - 1, BLOCK + 1, 2 * BLOCK, MAX_MESSAGE, MAX_MESSAGE + 1, wire.CONTROL_LIMIT, wire.CONTROL_LIMIT + 1,
     wire.MAX_BLOCK, wire.MAX_BLOCK + 1, wire.MAX_AUTH_DATA, wire.MAX_AUTH_DATA + 1, wire.DEFAULT_MAX_MESSAGE}
    | set(Encryption) | set(Mac) | set(ErrorCode) | set(MessageId)
)
"""Values a u32 field is set to: edges, this corpus's limits, algorithm codes, error codes, message ids."""

FILLER_MAX = 70_000
"""Bytes that may follow a header announcing more than any limit: well past the fuzzer's memory bound,
so an engine that buffered them would be caught."""

FrameEdit = Callable[[Random, bytes], bytes]


def u32(rng: Random) -> int:
    return rng.choice(INTERESTING) if rng.random() < 0.85 else rng.getrandbits(32)


def _put_word(frame: bytes, offset: int, value: int) -> bytes:
    return frame[:offset] + _U32.pack(value) + frame[offset + 4 :]


def _with_payload(frame: bytes, payload: bytes, rng: Random) -> bytes:
    """``frame`` carrying ``payload``; its DataLength follows, mostly (else it lies)."""
    head = frame[:HEADER_SIZE]
    if rng.random() < 0.7:
        head = _put_word(head, 8, len(payload))
    return head + payload


# --- edits of one frame ---------------------------------------------------------------------------


def edit_header(rng: Random, frame: bytes) -> bytes:
    """One header field: mostly MessageId, DataLength, Option or ErrNo; sometimes the unused ones."""
    field = rng.choices(range(8), weights=(1, 4, 4, 3, 1, 2, 1, 1))[0]
    value: int
    if field == 1 and rng.random() < 0.5:
        value = rng.choice(list(MessageId))
    elif field == 2 and rng.random() < 0.5:
        value = max(0, len(frame) - HEADER_SIZE + rng.randint(-9, 9))
    else:
        value = u32(rng)
    return _put_word(frame, 4 * field, value)


def edit_word(rng: Random, frame: bytes) -> bytes:
    """A 4-byte-aligned payload word (a status, key id, algorithm, length or random number half)."""
    words = (len(frame) - HEADER_SIZE) // 4
    if not words:
        return edit_header(rng, frame)
    return _put_word(frame, HEADER_SIZE + 4 * rng.randrange(words), u32(rng))


def edit_payload(rng: Random, frame: bytes) -> bytes:
    """Bytes of the payload flipped, set, inserted or removed."""
    body = bytearray(frame[HEADER_SIZE:])
    what = rng.randrange(4)
    at = rng.randint(0, len(body))
    if what == 0 and body:
        body[min(at, len(body) - 1)] ^= 1 << rng.randrange(8)
    elif what == 1 and body:
        body[min(at, len(body) - 1)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
    elif what == 2:
        body[at:at] = rng.randbytes(rng.choice((1, 4, 8, rng.randint(1, 40))))
    else:
        del body[at : at + rng.choice((1, 4, 8, rng.randint(1, 40)))]
    return _with_payload(frame, bytes(body), rng)


def flip_bit(rng: Random, frame: bytes) -> bytes:
    """One bit anywhere in the frame, header included."""
    raw = bytearray(frame)
    raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    return bytes(raw)


def oversize(rng: Random, frame: bytes) -> bytes:
    """DataLength past every limit, followed by up to :data:`FILLER_MAX` bytes (cheap zeros)."""
    length = rng.choice((wire.CONTROL_LIMIT + 1, BLOCK + 8, MAX_MESSAGE + 1, 0x10000, 1 << 20, 0xFFFFFFFF))
    return _put_word(frame[:HEADER_SIZE], 8, length) + bytes(rng.randint(0, FILLER_MAX))


FRAME_EDITS: tuple[FrameEdit, ...] = (edit_header, edit_word, edit_payload, flip_bit, oversize)
FRAME_EDIT_WEIGHTS = (4, 3, 3, 2, 0.3)


def edit_frame(rng: Random, frame: bytes) -> bytes:
    return rng.choices(FRAME_EDITS, weights=FRAME_EDIT_WEIGHTS)[0](rng, frame)


# --- changes to a script of frames ------------------------------------------------------------------

ScriptOp = Callable[[Random, list[Step], Sequence[Sequence[bytes]]], None]


def _frames(steps: list[Step]) -> list[int]:
    return [i for i, s in enumerate(steps) if isinstance(s, bytes)]


def _some_frame(rng: Random, steps: list[Step]) -> int | None:
    indexes = _frames(steps)
    return rng.choice(indexes) if indexes else None


def drop(rng: Random, steps: list[Step], donors: Sequence[Sequence[bytes]]) -> None:
    if (i := _some_frame(rng, steps)) is not None:
        del steps[i]


def _run_length(rng: Random) -> int:
    """How many frames a copy takes: mostly one, sometimes a whole message's worth."""
    return rng.choice((1, 1, 1, 2, 3, rng.randint(4, 12)))


def duplicate(rng: Random, steps: list[Step], donors: Sequence[Sequence[bytes]]) -> None:
    """Frames again: right after themselves, or later (a replay within the link)."""
    if (i := _some_frame(rng, steps)) is not None:
        run = [s for s in steps[i : i + _run_length(rng)] if isinstance(s, bytes)]
        at = i + len(run) if rng.random() < 0.5 else rng.randint(i + 1, len(steps))
        steps[at:at] = run


def swap(rng: Random, steps: list[Step], donors: Sequence[Sequence[bytes]]) -> None:
    """Two frames change places: neighbours mostly, since that is where state machines are tested."""
    indexes = _frames(steps)
    if len(indexes) < 2:
        return
    k = rng.randrange(len(indexes) - 1)
    i = indexes[k]
    j = indexes[k + 1] if rng.random() < 0.6 else rng.choice(indexes)
    steps[i], steps[j] = steps[j], steps[i]


def move(rng: Random, steps: list[Step], donors: Sequence[Sequence[bytes]]) -> None:
    """A frame moves elsewhere, across the end's own calls too."""
    if (i := _some_frame(rng, steps)) is not None:
        frame = steps.pop(i)
        steps.insert(rng.randint(0, len(steps)), frame)


def splice(rng: Random, steps: list[Step], donors: Sequence[Sequence[bytes]]) -> None:
    """Frames of another link (any suite, either profile, either direction) inserted or put in place of as
    many: one frame, or a whole message, which a hardened end must refuse as replayed across links."""
    donor = rng.choice(donors)
    start = rng.randrange(len(donor))
    run = list(donor[start : start + _run_length(rng)])
    at = rng.randint(0, len(steps))
    steps[at : at + (len(run) if rng.random() < 0.5 else 0)] = run


def _message_spans(steps: Sequence[Step]) -> list[tuple[int, int]]:
    """Where each whole message of a stream lies: from its request to its MAC, both included."""
    spans, start = [], None
    for i, step in enumerate(steps):
        if not isinstance(step, bytes):
            continue
        mid = _U32.unpack_from(step, 4)[0]
        if mid == MessageId.MESSAGE_TRANSMISSION_RQ:
            start = i
        elif mid == MessageId.MAC_TRANSMISSION_NOTIF and start is not None:
            spans.append((start, i))
            start = None
    return spans


def transplant(rng: Random, steps: list[Step], donors: Sequence[Sequence[bytes]]) -> None:
    """A whole message, request to MAC, from a donor link put in place of (or before) one of this link's.

    Drawn from the same link it is a replay, from the receiver's own direction a reflection, from
    another link of the suite a replay across links: a hardened end must refuse each.
    """
    donor = rng.choice(donors)
    theirs, ours = _message_spans(donor), _message_spans(steps)
    if not theirs or not ours:
        return
    a, b = rng.choice(theirs)
    c, d = rng.choice(ours)
    steps[c : d + 1 if rng.random() < 0.5 else c] = donor[a : b + 1]


def cut(rng: Random, steps: list[Step], donors: Sequence[Sequence[bytes]]) -> None:
    """The link ends early (the peer stops sending, or hangs up if an end of stream follows)."""
    del steps[rng.randint(0, len(steps)) :]


def edit(rng: Random, steps: list[Step], donors: Sequence[Sequence[bytes]]) -> None:
    if (i := _some_frame(rng, steps)) is not None:
        frame = steps[i]
        assert isinstance(frame, bytes)
        steps[i] = edit_frame(rng, frame)


SCRIPT_OPS: tuple[ScriptOp, ...] = (drop, duplicate, swap, move, splice, transplant, cut, edit)
SCRIPT_OP_WEIGHTS = (1, 1, 1, 0.5, 1, 1, 0.4, 6)


# --- the byte stream --------------------------------------------------------------------------------


def edit_stream(rng: Random, data: bytes) -> bytes:
    """A byte-level change that ignores frame boundaries."""
    raw = bytearray(data)
    at = rng.randrange(len(raw))
    span = rng.choice((1, 2, 4, 8, 31, 32, 33, rng.randint(1, 200)))
    what = rng.randrange(5)
    if what == 0:
        raw[at] ^= 1 << rng.randrange(8)
    elif what == 1:
        raw[at:at] = rng.randbytes(span)
    elif what == 2:
        del raw[at : at + span]
    elif what == 3:
        raw[at:at] = raw[at : at + span]
    else:
        del raw[at:]
    return bytes(raw)


def _pieces(rng: Random, data: bytes) -> Iterator[bytes]:
    """``data`` cut for receive_data: whole, in pieces of one size, or at random places."""
    how = rng.randrange(3)
    if how == 0:
        yield data
        return
    if how == 1:
        size = rng.choice((1, 3, 8, 31, 32, 33, 64)) if len(data) <= 2048 else rng.choice((31, 32, 33, 64))
        yield from (data[i : i + size] for i in range(0, len(data), size))
        return
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 12)))) if len(data) > 1 else []
    yield from (data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True))


def deliveries(rng: Random, steps: list[Step]) -> list[Step]:
    """The steps as receive_data calls: frame by frame as recorded, or joined between calls and re-cut."""
    if rng.random() < 0.25:
        return steps
    out: list[Step] = []
    run: list[bytes] = []
    for step in [*steps, None]:
        if isinstance(step, bytes):
            run.append(step)
            continue
        if run:
            joined = b"".join(run)
            if rng.random() < 0.3:
                joined = edit_stream(rng, joined)
            out += [piece for piece in _pieces(rng, joined) if piece]
            run = []
        if isinstance(step, Act):
            out.append(step)
    return out


def mutate(rng: Random, script: Sequence[Step], donors: Sequence[Sequence[bytes]]) -> list[Step]:
    """One input: a few changes to ``script`` (``donors``: other links' frames, each link's in order),
    cut into receive_data calls, maybe an end of stream."""
    steps = list(script)
    for _ in range(1 + min(int(rng.expovariate(1.0)), 5)):
        rng.choices(SCRIPT_OPS, weights=SCRIPT_OP_WEIGHTS)[0](rng, steps, donors)
    steps = deliveries(rng, steps)
    if rng.random() < 0.2:
        steps.append(b"")  # the peer closes the connection
    return steps


class Tap:
    """A ConnectionPair intercept that changes a few frames of a live link (tests.helpers.Intercept).

    The honest ends react to each change (a NAK, a request held or answered, their next message
    sealed on a chain the change has moved), which a replayed stream cannot show. Frames are counted
    as they pass; the ones picked get one change each: dropped, duplicated, held back until the next
    frame passes, preceded by an earlier frame of the link, preceded or replaced by a frame of another
    link, or edited as in :data:`FRAME_EDITS`.
    """

    def __init__(self, rng: Random, donors: Sequence[bytes], frames: int) -> None:
        self._rng = rng
        self._donors = donors
        count = 1 + min(int(rng.expovariate(1.2)), 3)
        self._picked = set(rng.sample(range(frames), min(count, frames)))
        self._seen: list[bytes] = []
        self._held: list[bytes] = []

    def __call__(self, sender: Role, frame: Frame) -> list[bytes]:
        raw = frame.raw
        index = len(self._seen)
        self._seen.append(raw)
        released, self._held = self._held, []
        if index not in self._picked:
            return [raw, *released]
        rng = self._rng
        what = rng.randrange(6)
        if what == 0:
            out = []
        elif what == 1:
            out = [raw, raw]
        elif what == 2:
            self._held = [raw]
            out = []
        elif what == 3:
            out = [rng.choice(self._seen), raw]
        elif what == 4:
            out = [rng.choice(self._donors)] if rng.random() < 0.5 else [rng.choice(self._donors), raw]
        else:
            out = [edit_frame(rng, raw)]
        return out + released
