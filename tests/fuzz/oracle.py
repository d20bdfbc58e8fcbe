"""Running one fuzz input, and what counts as a finding.

The engine promises (iscl_hsm.engine.connection, docs/security.md):

* whatever the peer sends, ``receive_data`` fails only with an :class:`~iscl_hsm.errors.IsclError`,
  and ``data_to_send``/``prepare`` and the application's calls never fail otherwise;
* a MessageReceived is a message the honest peer sent, unaltered, whenever the suite has a MAC;
  the hardened profile also binds it to its place (no replay, no reordering); V1.00 documents two
  exceptions, whole messages replayed from other links of the suite and its first-message flaw with
  DES-CBC + DES-MAC (tests.helpers.first_message_malleable), so those are not findings;
* every header is checked before its payload is buffered, so the engine holds little whatever it is fed;
* and, implicitly, a call returns in a moment.

Each broken promise is a :class:`Finding`. An input is an :class:`Input`, which is also its reproducer.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from random import Random
from typing import Any, TypeVar

import iscl_hsm
from iscl_hsm.engine import ChallengeGuard, Connection, MessageReceived, Profile, Role
from iscl_hsm.errors import IsclError
from iscl_hsm.wire import Mac, MessageId
from tests.helpers import everything_to_send, first_message_malleable, other, split_frames

from .corpus import MAX_MESSAGE, Act, Connect, Corpus, Session, Step, perform
from .mutate import Tap

MEMORY_BOUND = 4 * MAX_MESSAGE
"""Bytes an end may hold between calls: a frame's worth of input, a message half received, its own
output. A correct engine stays far below (a few hundred bytes here); FILLER_MAX goes far above."""

SLOW = 1.0
"""Seconds after which a single engine call is reported (not asserted: a loaded machine is slow too)."""

ENGINE = Path(iscl_hsm.__file__).resolve().parent
ENGINE_MODULES = ("iscl_hsm.engine.", "iscl_hsm.wire")
"""Where the engine's objects live (retained_bytes enters only these)."""


@dataclasses.dataclass(frozen=True)
class Finding:
    """A broken promise: ``kind`` and ``what`` (an exception type, a call) and ``where`` (a source line or suite)."""

    kind: str
    what: str
    where: str
    detail: str

    @property
    def key(self) -> tuple[str, str, str]:
        """Findings with the same key are one bug met again."""
        return self.kind, self.what, self.where

    def __str__(self) -> str:
        return f"{self.kind}: {self.what} at {self.where}"


@dataclasses.dataclass(frozen=True)
class Input:
    """One fuzz input: a mutated stream fed to one fresh end, or a live pair with a seeded tap."""

    session: str
    role: Role | None = None  # stream mode: the end fed ``steps``
    steps: tuple[Step, ...] = ()
    seed: int | None = None  # live mode: the Tap's seed

    def to_json(self) -> dict[str, Any]:
        if self.role is None:
            return {"mode": "live", "session": self.session, "seed": self.seed}
        steps = [s.hex() if isinstance(s, bytes) else {"call": s.name, "data": s.data.hex()} for s in self.steps]
        return {"mode": "stream", "session": self.session, "role": self.role.value, "steps": steps}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Input:
        if data["mode"] == "live":
            return cls(data["session"], seed=data["seed"])
        role = Role(data["role"])
        steps = tuple(bytes.fromhex(s) if isinstance(s, str) else Act(role, s["call"], bytes.fromhex(s["data"]))
                      for s in data["steps"])
        return cls(data["session"], role, steps)


@dataclasses.dataclass
class Result:
    findings: list[Finding]
    outcome: str
    """How the input ended (a final state or an error code), for the campaign's statistics."""
    slowest: float = 0.0
    """Seconds of the slowest engine call (stream mode), to show how far below :data:`SLOW` they stay."""
    held: int = 0
    """The most bytes the end was seen holding, to show how far below :data:`MEMORY_BOUND` it stays."""


def location(exc: BaseException) -> str:
    """The innermost line of iscl_hsm the exception passed through (else its innermost line)."""
    frames = [(Path(f.filename).resolve(), f) for f in traceback.extract_tb(exc.__traceback__)]
    inside = [(path, f) for path, f in frames if path.is_relative_to(ENGINE)] or frames
    if not inside:
        return "?"
    path, f = inside[-1]
    shown = path.relative_to(ENGINE.parent) if path.is_relative_to(ENGINE.parent) else path
    return f"{shown}:{f.lineno} in {f.name}"


def escaped(exc: BaseException) -> Finding:
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return Finding("exception", name, location(exc), "".join(traceback.format_exception(exc)))


def retained_bytes(conn: Connection) -> int:
    """Bytes the engine's own objects hold (buffers, queues, half-received messages), found by walking them.

    Walking rather than naming attributes keeps the check true to whatever the engine's internals
    become. Only the engine's own objects are entered: keys, key holders and the challenge guard are
    not where it buffers.
    """
    seen: set[int] = {id(conn)}
    stack = _attributes(conn)  # whatever the connection's class (a test plants its own)
    total = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, bytes | bytearray):
            total += len(obj)
        elif isinstance(obj, memoryview):
            total += 0 if obj.obj is None else obj.nbytes
        elif isinstance(obj, list | tuple | deque | set | frozenset):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif type(obj).__module__.startswith(ENGINE_MODULES) and not isinstance(obj, ChallengeGuard | Enum):
            stack += _attributes(obj)
    return total


def _attributes(obj: object) -> list[object]:
    slots = (getattr(obj, name, None) for cls in type(obj).__mro__ for name in getattr(cls, "__slots__", ()))
    return [*getattr(obj, "__dict__", {}).values(), *slots]


SEALED = "sealed"
"""Put in an end's timeline (stream mode) when it has sent data blocks: its V1.00 chain has moved.
MessageSent does not say so: it comes with the acceptance, and the blocks are sealed at the next
data_to_send, so a peer's MAC in the same receive_data call is still checked on an unmoved chain."""


def sent_blocks(output: bytes) -> bool:
    return any(f.is_(MessageId.MESSAGE_TRANSMISSION_NOTIF) for f in split_frames(output))


def forged(timeline: Sequence[object], receiver: Role, session: Session, corpus: Corpus) -> str | None:
    """Why the messages ``receiver`` got break the suite's integrity promise, or None if they do not.

    ``timeline`` is the end's events, in stream mode with :data:`SEALED` among them; without it (live
    mode) any end's first message counts as its link's first, as in test_engine_adversarial.py.
    """
    suite = session.suite
    if suite.mac is Mac.NONE:
        return None  # no integrity at all (security.md, "What remains unprotected")
    peer = session.sent[other(receiver)]
    v100 = suite.profile is Profile.V100
    allowed = corpus.sent_in_suite(suite) if v100 else set(peer)  # V1.00: whole messages replay across links
    malleable = first_message_malleable(suite.profile, suite.encryption, suite.mac)
    chain_moved = False  # V1.00's one chain moves with every message either way
    next_index = 0
    for event in timeline:
        if event is SEALED:
            chain_moved = True
        if not isinstance(event, MessageReceived):
            continue
        first_on_link, chain_moved = not chain_moved, True
        data = event.data
        if data not in allowed:
            if malleable and first_on_link and len(data) in {len(m) for m in peer}:
                continue
            return f"the {receiver.value} received {len(data)} bytes the peer never sent: {data[:48].hex()}"
        if not v100:
            if data not in peer[next_index:]:
                return f"the {receiver.value} received the peer's message {peer.index(data)} again or out of order"
            next_index = peer.index(data, next_index) + 1
    return None


T = TypeVar("T")


class Probe:
    """Makes the calls of one input, timing each, and keeps the findings."""

    def __init__(self, session: Session, slow: float = SLOW) -> None:
        self.session = session
        self.slow = slow
        self.findings: list[Finding] = []
        self.slowest = 0.0
        self.held = 0

    def call(self, what: str, fn: Callable[..., T], *args: object) -> T:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            elapsed = time.perf_counter() - start
            self.slowest = max(self.slowest, elapsed)
            if elapsed > self.slow:
                self.findings.append(Finding("slow", what, self.session.suite.name, f"one {what} call took {elapsed:.2f} s"))

    def memory(self, conn: Connection) -> None:
        held = retained_bytes(conn)
        self.held = max(self.held, held)
        if held > MEMORY_BOUND:
            self.findings.append(Finding("memory", "held bytes", self.session.suite.name,
                                         f"the {conn.role.value} held {held} bytes between calls (bound {MEMORY_BOUND})"))

    def delivered(self, timeline: Sequence[object], receiver: Role, corpus: Corpus) -> None:
        if (why := forged(timeline, receiver, self.session, corpus)) is not None:
            self.findings.append(Finding("forged delivery", self.session.suite.profile.value, self.session.suite.name, why))


def run_stream(corpus: Corpus, inp: Input, connect: Connect, slow: float) -> Result:
    """Feed ``inp.steps`` to a fresh end, draining and preparing after every call as a transport does."""
    assert inp.role is not None
    session = corpus.by_name[inp.session]
    probe = Probe(session, slow)
    conn = connect(session, inp.role)
    events: list[object] = []  # and SEALED
    outcome = ""
    fed = 0
    try:
        for step in inp.steps:
            if isinstance(step, Act):
                try:
                    probe.call("application call", step.apply, conn)
                except IsclError:
                    pass  # the application is told no (the link is not ready, or closing): fine
                continue
            try:
                events += probe.call("receive_data", conn.receive_data, step)
            except IsclError as exc:
                events += exc.events
                outcome = f"{type(exc).__name__} {exc.code.name}"
                probe.call("data_to_send", everything_to_send, conn)  # the NAK that tells the peer why
                break
            if sent_blocks(probe.call("data_to_send", everything_to_send, conn)):
                events.append(SEALED)
            probe.call("prepare", conn.prepare)
            fed += len(step)
            if fed > MEMORY_BOUND // 4:  # before, it cannot hold much: walking every call would halve the rate
                probe.memory(conn)
        else:  # the link took the whole input: what does it hold at the end?
            probe.memory(conn)
    except Exception as exc:  # noqa: BLE001 - anything else escaping the engine is the finding
        probe.findings.append(escaped(exc))
        outcome = "exception"
    probe.delivered(events, inp.role, corpus)
    return Result(probe.findings, outcome or conn.state.name, probe.slowest, probe.held)


def run_live(corpus: Corpus, inp: Input, connect: Connect) -> Result:
    """Run the session's calls between two fresh ends while a seeded :class:`Tap` changes frames in flight.

    Exceptions and deliveries are checked; time and memory are left to the stream mode, which makes
    every engine call itself."""
    assert inp.seed is not None
    session = corpus.by_name[inp.session]
    probe = Probe(session)
    pair = session.pair(connect)
    frames = sum(isinstance(s, bytes) for script in session.scripts.values() for s in script)
    pair.intercept = Tap(Random(inp.seed), corpus.frames, frames)
    try:
        perform(pair, session.phases)
    except Exception as exc:  # noqa: BLE001
        probe.findings.append(escaped(exc))
    for role in Role:
        probe.delivered(pair.events[role], role, corpus)
    codes = sorted(err.code.name for err in pair.errors.values())
    return Result(probe.findings, "live " + (" ".join(codes) or f"{pair.server.state.name}/{pair.client.state.name}"))


def run(corpus: Corpus, inp: Input, *, connect: Connect | None = None, slow: float = SLOW) -> Result:
    """Run one input; ``connect`` makes the ends (default: the session's deterministic ones)."""
    make = connect or Session.connection
    return run_live(corpus, inp, make) if inp.role is None else run_stream(corpus, inp, make, slow)
