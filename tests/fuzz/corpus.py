"""The seed corpus: real links between two engine Connections, recorded frame by frame.

Mutating real sessions, rather than making frames up, is what gets a fuzzer past the handshake: the
mutated stream meets the receiver in every state a real peer brings it to (session-key exchanges,
crossing requests, MAC checks, the close), where random frames (tests/unit/test_engine_adversarial.py)
rarely get beyond the first header check.

Every end draws its challenges and random numbers from streams seeded by the session's name, so a
fresh :meth:`Session.connection` behaves exactly as the recorded end did: fed the peer's recorded
frames (its :attr:`Session.scripts`), it authenticates, opens every message and closes. A mutation
therefore changes one thing about a link the receiver would otherwise have completed.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Callable, Iterable
from functools import cached_property

from iscl_hsm import wire
from iscl_hsm.engine import ChallengeGuard, Config, Connection, Md5Order, Profile, Role, State
from iscl_hsm.errors import IsclError
from iscl_hsm.keyholder.memory import MemoryKeyHolder
from iscl_hsm.wire import Encryption, Mac
from tests.helpers import AUTH_KEYS, ENC_KEYS, ConnectionPair, cfg, other

BLOCK = 16
"""A small block length, so that every message is several MESSAGE_TRANSMISSION_NOTIFs."""
MAX_MESSAGE = 4096
"""A small largest message, so that an engine that buffers past its limits is plain to see."""


@dataclasses.dataclass(frozen=True)
class Suite:
    """How a link is protected; both ends use the same."""

    profile: Profile
    encryption: Encryption
    mac: Mac
    key_id: int
    md5_order: Md5Order = Md5Order.ENCRYPT_OUTPUT

    @property
    def name(self) -> str:
        key = "session" if self.key_id == wire.SESSION_KEYS else f"key{self.key_id}"
        order = "-encrypt-random" if self.md5_order is Md5Order.ENCRYPT_RANDOM else ""
        return f"{self.profile.value}/{self.encryption.name.lower()}-{self.mac.name.lower()}{order}-{key}"

    @property
    def accepts(self) -> tuple[Profile, Encryption, Mac, int]:
        """What a receiver of this suite takes (a V1.00 receiver checks either MD5 order)."""
        return self.profile, self.encryption, self.mac, self.key_id

    def config(self, through_mode: bool) -> Config:
        return cfg(
            self.profile, encryption=self.encryption, mac=self.mac, enc_key_id=self.key_id,
            md5_order=self.md5_order, max_block=BLOCK, max_message=MAX_MESSAGE, through_mode=through_mode,
        )


def suites() -> list[Suite]:
    """Every profile, encryption, MAC and key id (1, session keys), and V1.00's other MD5 order."""
    out = [Suite(p, e, m, k) for p, e, m, k in itertools.product(Profile, Encryption, Mac, [1, wire.SESSION_KEYS])]
    out += [Suite(Profile.V100, e, Mac.MD5, k, Md5Order.ENCRYPT_RANDOM)
            for e, k in itertools.product(Encryption, [1, wire.SESSION_KEYS])]
    return out


@dataclasses.dataclass(frozen=True)
class Act:
    """One call the application makes at one end (``data`` for the sends)."""

    role: Role
    name: str  # "initiate" | "send_message" | "send_non_secure" | "close"
    data: bytes = b""

    def apply(self, conn: Connection) -> None:
        call: Callable[..., None] = getattr(conn, self.name)
        if self.name.startswith("send"):
            call(self.data)
        else:
            call()


Phase = tuple[Act, ...]
"""Calls made together; then the pair is pumped until both ends are quiet."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the applications do on a link: phases of (role, call, message length)."""

    name: str
    through_mode: bool
    phases: tuple[tuple[tuple[Role, str, int], ...], ...]

    def acts(self, label: str) -> tuple[Phase, ...]:
        """The phases with message data of their own, unique to ``label`` (so a delivery names its origin)."""
        count = itertools.count()
        return tuple(
            tuple(Act(role, name, random.Random(f"{label}/{next(count)}").randbytes(size)) for role, name, size in phase)
            for phase in self.phases
        )


S, C = Role.SERVER, Role.CLIENT
PLANS = (
    Plan("turns", False, (
        ((S, "initiate", 0),),
        ((C, "send_message", 37),),
        ((S, "send_message", 16),),
        ((C, "send_message", 0), (C, "send_message", 100)),
        ((C, "close", 0),),
    )),
    Plan("crossing", True, (
        ((S, "initiate", 0),),
        ((C, "send_message", 9), (S, "send_message", 24)),  # two requests cross
        ((S, "send_non_secure", 10), (C, "send_message", 8), (S, "send_message", 64)),
        ((S, "send_message", 33), (S, "close", 0)),  # the close waits for the message
    )),
)

Step = bytes | Act
"""What a receiving end meets: the peer's bytes (one receive_data call each), or a call of its own."""


@dataclasses.dataclass(frozen=True)
class Session:
    """One recorded link: its settings, its calls, and what each end sent and was sent."""

    name: str
    suite: Suite
    config: Config
    phases: tuple[Phase, ...]
    scripts: dict[Role, tuple[Step, ...]]
    """Per end: the peer's frames in the order they arrived, with the end's own calls among them."""

    def connection(self, role: Role, kind: type[Connection] = Connection) -> Connection:
        """A fresh end that, fed its script, does what the recorded one did (``kind``: a test's faulty engine)."""
        holder = MemoryKeyHolder(AUTH_KEYS, ENC_KEYS, name=role.value,
                                 random=random.Random(f"{self.name}/{role.value}/challenges").randbytes)
        return kind(role, holder, self.config, guard=ChallengeGuard(),
                    random=random.Random(f"{self.name}/{role.value}/randoms").randbytes)

    def pair(self, connect: Connect | None = None) -> ConnectionPair:
        """Both ends, fresh (from ``connect``, default :meth:`connection`), back to back (tests.helpers),
        each preparing as transports do."""
        make = connect or Session.connection
        return ConnectionPair(server=make(self, Role.SERVER), client=make(self, Role.CLIENT), prepare=True)

    @cached_property
    def sent(self) -> dict[Role, tuple[bytes, ...]]:
        """The secured messages each end sent, in order."""
        return {role: tuple(a.data for phase in self.phases for a in phase if a.role is role and a.name == "send_message")
                for role in Role}


Connect = Callable[[Session, Role], Connection]
"""How a fuzz run makes an end (a test of the harness plants a faulty one)."""


def perform(pair: ConnectionPair, phases: Iterable[Phase], before: Callable[[Act], object] = lambda act: None) -> None:
    """Make each phase's calls, then pump; a call on an end that has failed is skipped.

    Errors are kept in ``pair.errors`` (a recording checks there are none); anything other than an
    IsclError goes on up, which is what the fuzzer's live mode looks for.
    """
    for phase in phases:
        for act in phase:
            before(act)
            try:
                act.apply(pair.conn(act.role))
            except IsclError:
                pass  # the end is dead or closing: the engine said so, which is all that is asked of it
        pair.pump(raise_errors=False)


def record(suite: Suite, plan: Plan) -> Session:
    """Run ``plan`` between two fresh ends and write down where each end's calls fell among its input."""
    name = f"{suite.name}/{plan.name}"
    phases = plan.acts(name)
    session = Session(name, suite, suite.config(plan.through_mode), phases, scripts={})
    pair = session.pair()
    calls: dict[Role, list[tuple[int, Act]]] = {role: [] for role in Role}
    perform(pair, phases, lambda act: calls[act.role].append((len(pair.sent_by(other(act.role))), act)))
    assert not pair.errors and all(c.state is State.CLOSED for c in (pair.server, pair.client)), (name, pair.errors)
    scripts = {}
    for role in Role:
        steps: list[Step] = [f.raw for f in pair.sent_by(other(role))]
        for position, act in reversed(calls[role]):
            steps.insert(position, act)
        scripts[role] = tuple(steps)
    return dataclasses.replace(session, scripts=scripts)


class Corpus:
    """Every session of every suite and plan, and the frames a mutation may splice in."""

    def __init__(self) -> None:
        self.sessions = [record(suite, plan) for suite in suites() for plan in PLANS]
        self.by_name = {s.name: s for s in self.sessions}
        self.streams: list[tuple[bytes, ...]] = []
        """What each end of each link was sent, frame by frame (whole messages are spliced from here)."""
        self._kin: dict[tuple[Profile, Encryption, Mac, int], list[tuple[bytes, ...]]] = {}
        self._sent_in_suite: dict[tuple[Profile, Encryption, Mac, int], set[bytes]] = {}
        for s in self.sessions:
            self._sent_in_suite.setdefault(s.suite.accepts, set()).update(*s.sent.values())
            for role in Role:
                stream = tuple(step for step in s.scripts[role] if isinstance(step, bytes))
                self.streams.append(stream)
                self._kin.setdefault(s.suite.accepts, []).append(stream)
        self.frames = [frame for stream in self.streams for frame in stream]

    def sent_in_suite(self, suite: Suite) -> set[bytes]:
        """Every secured message any end sent on any recorded link a receiver of ``suite`` takes."""
        return self._sent_in_suite[suite.accepts]

    def kin(self, suite: Suite) -> list[tuple[bytes, ...]]:
        """The streams of the links a receiver of ``suite`` takes: splicing from these replays whole messages."""
        return self._kin[suite.accepts]
