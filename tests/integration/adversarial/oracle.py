"""What every CLI case must show, whatever the fault (docs/adversarial.md, "The oracle").

For each end X (server, client) and its peer Y:

1. X ended within BOUND seconds (no hang);
2. X's stderr has no traceback and no asyncio complaint;
3. X's output is a prefix of what Y sent;
4. X's output is incomplete only if X exits non-zero, except in V1.00 when the fault was a
   disconnection injected towards X: X may then end with exit 0, a prefix, and the line "closed by
   the peer (unauthenticated in V1.00 ...)" on stderr; hardened never prints that line;
5. X exits 0 only if Y's output is everything X sent, and (without that line) X's output is complete.

Exact expectations on top, from what the fault met:

* a fault that never fired (a direction shorter than its position) and a flipped bit in a header
  field every receiver ignores (outside what the hardened handshake MACs cover: every handshake frame
  but COMPLETION): both ends deliver everything and exit 0;
* a flipped bit of an ignored header field under the hardened handshake MACs: both ends fail and
  deliver nothing;
* a flipped bit in a data block or MAC of message m under a MAC: the receiver delivers exactly the
  messages before m and exits non-zero;
* where nothing protects the data (MAC none, and V1.00 DES-CBC + DES-MAC on a link's first message,
  tests.helpers.first_message_malleable): the flipped bit is delivered, and exactly as CBC predicts
  (its block garbled, the same bit flipped in the next block; with encryption none, that bit alone);
  a flipped session-key random number under MAC none garbles its whole message, or fails its padding.
"""

from __future__ import annotations

from dataclasses import dataclass

from iscl_hsm.engine import Profile
from iscl_hsm.wire import Encryption, Mac, MessageId
from tests.helpers import first_message_malleable

from ..proxy import Link, Seen
from ..test_cli import CLOSE_NOTE
from .cli import BOUND, MAX_MESSAGE, CliResult, End, Suite, frames_summary
from .faults import IGNORED_FIELDS, Kind
from .gateway import ISCL_CODE, STORE_BOUND, Store
from .printouts import strays

HANDSHAKE = frozenset(
    {
        MessageId.LINE_CONNECTION_CHECK_RQ,
        MessageId.LINE_CONNECTION_CHECK_RP,
        MessageId.MUTUAL_AUTH_RQ,
        MessageId.MUTUAL_AUTH_RP,
        MessageId.MUTUAL_AUTH_PASS1_NOTIF,
        MessageId.MUTUAL_AUTH_PASS2_NOTIF,
        MessageId.MUTUAL_AUTH_PASS3_NOTIF,
        MessageId.MUTUAL_AUTH_COMPLETION_NOTIF,
    }
)
TRANSCRIPT = HANDSHAKE - {MessageId.MUTUAL_AUTH_COMPLETION_NOTIF}
"""What the hardened handshake MACs cover, header and payload (docs/protocol.md §6.3): every handshake
frame but the last, COMPLETION, whose own header nothing checks."""
RECEIVER = {"c2s": "server", "s2c": "client"}
SIGTERMED = 143
STOPPED_BEFORE_A_LINK = "iscl server: stopped by SIGTERM; no link was made"
"""A two-way server whose one link failed its handshake waits for another client; the case stops it
(cli.TwoWayServer.finish), and it must say so."""


def first_message_blocks(link: Link | None) -> list[Seen]:
    """The data blocks of the link's first message: those before the first MAC on the link (V1.00
    moves one message at a time, so they are all the first message's)."""
    blocks = []
    for seen in [] if link is None else list(link.seen):
        if seen.frame.message_id == MessageId.MAC_TRANSMISSION_NOTIF:
            break
        if seen.frame.message_id == MessageId.MESSAGE_TRANSMISSION_NOTIF:
            blocks.append(seen)
    return blocks


def messages(sent: bytes) -> list[bytes]:
    """What an end sent, as the messages it went out in (stdin read MAX_MESSAGE bytes at a time)."""
    return [sent[i : i + MAX_MESSAGE] for i in range(0, len(sent), MAX_MESSAGE)]


@dataclass(frozen=True)
class Change:
    """How an undetected fault may alter message ``index`` of what the receiver gets."""

    index: int
    offset: int | None
    """The flipped bit's byte in the message's data blocks; None: the whole message is garbled."""
    bit: int = 0
    cbc: bool = False

    def allows(self, sent: bytes, got: bytes) -> bool:
        """Whether ``got`` is ``sent`` with this change (the message may end the output early)."""
        if self.offset is None:
            return True  # checked by length in Verdict.delivered
        if len(got) != len(sent):
            return False
        expected = bytearray(sent)
        if self.cbc:
            block = self.offset // 8 * 8
            expected[block : block + 8] = got[block : block + 8]  # garbled: any value
            expected[block + 8 + self.offset % 8] ^= 1 << self.bit
        else:
            expected[self.offset] ^= 1 << self.bit
        return bytes(expected) == got


class Verdict:
    """The oracle applied to one CLI case; :meth:`check` raises AssertionError naming every breach."""

    def __init__(self, result: CliResult) -> None:
        self.result = result
        self.case = result.case
        self.problems: list[str] = []
        handler = result.handler
        self.hit = None if handler is None else handler.hit
        self.change = self._undetected_change()

    def check(self) -> None:
        ends = {"server": self.result.server, "client": self.result.client}
        for name, end in ends.items():
            self._each(end, ends["client" if name == "server" else "server"])
        self._expected()
        if self.problems:
            raise AssertionError(self.describe())

    def outcome(self) -> str:
        """The case in a few words, for the campaign's summary: each end's delivery and exit status."""
        words = []
        for end, peer in ((self.result.server, self.result.client), (self.result.client, self.result.server)):
            got = self.delivered(end, peer.sent, lambda _: None)
            delivery = {True: "all", False: "prefix", None: "wrong"}[got]
            if got and end.output != peer.sent:
                delivery = "changed"  # as the oracle allows where nothing protects the data
            status = "hung" if end.status is None else "0" if end.status == 0 else "fail"
            note = "+note" if any(CLOSE_NOTE in line for line in end.stderr) else ""
            words.append(f"{end.name}:{delivery}/{status}{note}")
        return " ".join(words)

    def describe(self) -> str:
        r = self.result
        lines = [f"case {self.case.id}: " + "; ".join(self.problems)]
        for end in r.ends():
            lines.append(
                f"  {end.name}: exit {end.status} after {end.seconds:.1f} s, output {len(end.output)} of"
                f" the peer's bytes; stderr: {end.stderr}"
            )
        if self.hit is not None:
            lines.append(f"  the fault met {self.hit.direction}#{self.hit.index} {self.hit.frame!r}")
        lines.append("  frames: " + ", ".join(frames_summary(r.link)))
        return "\n".join(lines)

    # --- the five rules ---------------------------------------------------------------------------

    def _each(self, end: End, peer: End) -> None:
        fail = self.problems.append
        if end.status is None:
            fail(f"{end.name} did not end within {BOUND:g} s")
            return
        if stray := strays(end.stderr):
            fail(f"{end.name} printed {stray}")
        if end.status == SIGTERMED and end.stderr[-1:] != [STOPPED_BEFORE_A_LINK]:
            fail(f"{end.name} was stopped after its only link failed, but did not say no link was made")
        noted = any(CLOSE_NOTE in line for line in end.stderr)
        if noted and self.case.profile is Profile.HARDENED:
            fail(f"{end.name} printed the V1.00 close note in the hardened profile")
        complete = self.delivered(end, peer.sent, fail)
        if complete is False and end.status == 0 and not (self._injected_towards(end) and noted):
            fail(f"{end.name} exited 0 with an incomplete output")
        if end.status == 0:
            if self.delivered(peer, end.sent, lambda _: None) is not True:
                fail(f"{end.name} exited 0 but {peer.name} did not get all it sent")
            if not noted and complete is not True:
                fail(f"{end.name} exited 0 without the close note and without all {peer.name} sent")

    def delivered(self, end: End, sent: bytes, fail: object) -> bool | None:
        """True: ``end`` got all of ``sent``; False: a prefix; None: neither (reported through ``fail``)."""
        got = end.output
        if sent.startswith(got):
            return got == sent
        change = self.change if self.change is not None and RECEIVER[self._direction()] == end.name else None
        if change is not None:
            parts = messages(sent)
            start = sum(map(len, parts[: change.index]))
            message = parts[change.index]
            if got[:start] == sent[:start]:
                if change.offset is not None:
                    if change.allows(message, got[start : start + len(message)]) and sent[
                        start + len(message) :
                    ].startswith(got[start + len(message) :]):
                        return len(got) == len(sent)
                else:  # a garbled message: V1.00 strips 1..8 bytes of what it takes for padding
                    rest = got[start:]
                    lengths = (
                        range(len(message) - 7, len(message) + 1) if self._v100_pads() else [len(message)]
                    )
                    for size in lengths:
                        if sent[start + len(message) :].startswith(rest[size:]) and len(rest) >= size:
                            return len(got) - size + len(message) == len(sent)
        assert callable(fail)
        fail(f"{end.name}'s output is not a prefix of what it was sent")
        return None

    def _injected_towards(self, end: End) -> bool:
        fault = self.case.fault
        return (
            self.case.profile is Profile.V100
            and fault is not None
            and fault.kind is Kind.INJECT
            and RECEIVER[fault.direction] == end.name
        )

    # --- exact expectations ------------------------------------------------------------------------

    def _direction(self) -> str:
        return "" if self.case.fault is None else self.case.fault.direction

    def _v100_pads(self) -> bool:
        return self.case.profile is Profile.V100 and self.case.suite.encryption is Encryption.DES_CBC

    def _message_of_hit(self) -> int | None:
        """Which data message (0, 1, ...) of its direction the hit frame belongs to, if any."""
        if self.hit is None or self.result.link is None:
            return None
        frames = self.result.link.frames(self.hit.direction)[: self.hit.index + 1]
        if frames[-1].message_id not in (
            MessageId.MESSAGE_TRANSMISSION_RQ,
            MessageId.RNDNO_FOR_SESSION_KEY_RQ,
            MessageId.MESSAGE_TRANSMISSION_NOTIF,
            MessageId.MAC_TRANSMISSION_NOTIF,
        ):
            return None
        return sum(f.message_id == MessageId.MAC_TRANSMISSION_NOTIF for f in frames[:-1])

    def _undetected_change(self) -> Change | None:
        """The change a flipped bit makes where nothing checks the data (None: it is detected)."""
        fault, hit, suite = self.case.fault, self.hit, self.case.suite
        if fault is None or hit is None or fault.kind is not Kind.FLIP_PAYLOAD or not hit.frame.payload:
            return None
        index = self._message_of_hit()
        if index is None:
            return None
        cbc = suite.encryption is Encryption.DES_CBC
        offset = self.result.handler.payload_offset if self.result.handler else None
        if hit.frame.message_id == MessageId.MESSAGE_TRANSMISSION_NOTIF:
            malleable = first_message_malleable(self.case.profile, suite.encryption, suite.mac) and (
                hit in first_message_blocks(self.result.link)
            )
            if suite.mac is Mac.NONE or malleable:
                return Change(index, offset, fault.bit, cbc)
        if hit.frame.message_id == MessageId.RNDNO_FOR_SESSION_KEY_RQ and suite.mac is Mac.NONE and cbc:
            return Change(index, None)
        return None

    def _expected(self) -> None:
        fault, hit, r = self.case.fault, self.hit, self.result
        fail = self.problems.append
        both_complete = all(
            end.status == 0 and self.delivered(end, peer.sent, lambda _: None) is True
            for end, peer in ((r.server, r.client), (r.client, r.server))
        )
        if fault is None or hit is None:
            if not both_complete:
                fail("untouched, the link must deliver everything both ways and both ends exit 0")
            return
        covered = hit.frame.message_id in TRANSCRIPT
        if fault.kind is Kind.FLIP_HEADER or (fault.kind is Kind.FLIP_PAYLOAD and not hit.frame.payload):
            if fault.header_field in IGNORED_FIELDS:
                if covered and self.case.profile is Profile.HARDENED:
                    if any(end.status == 0 or end.output for end in r.ends()):
                        fail("a changed hardened handshake must fail both ends before any data")
                elif not both_complete:
                    fail(
                        f"a flipped {fault.header_field} bit is ignored: everything must arrive, both exit 0"
                    )
            return
        if fault.kind is not Kind.FLIP_PAYLOAD:
            return
        receiver = r.server if RECEIVER[fault.direction] == "server" else r.client
        index = self._message_of_hit()
        if self.change is not None:
            if self.change.offset is not None and not both_complete:
                fail("an undetected flip must leave the rest of the link intact: both ends exit 0")
            return
        if index is not None and hit.frame.message_id in (
            MessageId.MESSAGE_TRANSMISSION_NOTIF,
            MessageId.MAC_TRANSMISSION_NOTIF,
        ):
            sender = r.client if receiver is r.server else r.server
            before = b"".join(messages(sender.sent)[:index])
            if receiver.status == 0 or receiver.output != before:
                fail(
                    f"a flipped bit in message {index} must fail {receiver.name}"
                    " after exactly the messages before it"
                )


def check_cli(result: CliResult) -> None:
    Verdict(result).check()


# --- the gateway -----------------------------------------------------------------------------------


def store_problems(store: Store, *, profile: Profile | None = None, suite: Suite | None = None) -> list[str]:
    """What is wrong with one store through the gateway (docs/adversarial.md, "The gateway"):

    * storescu ended within STORE_BOUND (no hang), and each tunnel logged the link's line;
    * no false success: storescu reports its C-STORE response Success only if storescp holds the
      object with the very data set sent (dataset_bytes), and a stored object is never anything else;
    * every failure is reported: an object not stored identical means storescu reports a failure
      (Store.reported_failed), and one of the tunnels logged result=aborted with its ISCL code, unless the fault changed the
      link's first message under V1.00 DES-CBC + DES-MAC, which nothing protects: then DICOM's own
      refusal (an association rejected or aborted by storescp) is all there is;
    * every line's result is "closed" or "aborted: ... [ISCL nnn NAME]";
    * a link the fault did not touch stores the object and closes at both tunnels.

    ``profile`` and ``suite`` (for the first-message exception and the lines) are given by the
    checks of single cases; the soak checks the outcome alone.
    """
    problems = []
    if store.status is None:
        return [f"storescu did not end within {STORE_BOUND:g} s"]
    identical = store.identical
    if store.reported_stored and not identical:
        problems.append("storescu reported the object stored, but it is not on disk as sent (false success)")
    if not identical and not store.reported_failed:
        problems.append("the object is not on disk as sent, and storescu reported no failure")
    if store.stored is not None and not identical:
        problems.append("storescp holds an object that differs from the one sent")
    if profile is None:
        return problems
    for name in ("client", "server"):
        result = store.lines.get(name)
        if result is None:
            problems.append(f"the {name} tunnel logged no line for the link")
        elif result != "closed" and not (result.startswith("aborted: ") and ISCL_CODE.search(result)):
            problems.append(
                f"the {name} tunnel's result is neither closed nor aborted with an ISCL code: {result!r}"
            )
    hit = None if store.handler is None else store.handler.hit
    if hit is None:
        if store.reported_failed or not (store.reported_stored and identical) or set(store.lines.values()) != {"closed"}:
            problems.append("untouched, the object must be stored and both links closed")
        return problems
    first_message = (
        suite is not None
        and first_message_malleable(profile, suite.encryption, suite.mac)
        and store.handler is not None
        and store.handler.fault.kind is Kind.FLIP_PAYLOAD
        and hit in first_message_blocks(store.link)
    )
    if (
        store.reported_failed
        and not first_message
        and not any(r.startswith("aborted") for r in store.lines.values())
    ):
        problems.append("storescu reported a failure, but neither tunnel logged the link aborted")
    return problems


def check_store(profile: Profile, suite: Suite, store: Store) -> None:
    if problems := store_problems(store, profile=profile, suite=suite):
        hit = None if store.handler is None else store.handler.hit
        raise AssertionError(
            "; ".join(problems)
            + f"\n  storescu exit {store.status} after {store.seconds:.1f} s;"
            + f" stored: {store.stored is not None}"
            + f"\n  lines: {store.lines}\n  fault met: {hit and (hit.direction, hit.index, hit.frame)}"
            + "\n  frames: "
            + ", ".join(frames_summary(store.link))
            + "\n  storescu: "
            + " | ".join(store.output.splitlines()[-8:])
        )
