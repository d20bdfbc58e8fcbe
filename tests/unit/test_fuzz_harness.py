"""The fuzz harness (tests/fuzz) itself: its corpus replays, its oracle catches planted faults, its
inputs are reproducible, and a small campaign runs. ``make fuzz`` runs the real campaign (not in CI)."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iscl_hsm.engine import Connection, Event, MessageReceived, MessageSent, Profile, Role
from iscl_hsm.wire import Encryption, Mac
from tests.fuzz import campaign
from tests.fuzz.corpus import Connect, Corpus, Session
from tests.fuzz.oracle import MEMORY_BOUND, SEALED, Input, forged, retained_bytes, run


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return campaign.corpus()


def session_of(corpus: Corpus, profile: Profile, encryption: Encryption, mac: Mac) -> Session:
    return next(s for s in corpus.sessions
                if (s.suite.profile, s.suite.encryption, s.suite.mac, s.suite.key_id) == (profile, encryption, mac, 1))


def planted(fault: Callable[[Connection, list[Event]], None]) -> Connect:
    """Ends whose receive_data calls ``fault`` once the link is up: a bug for the oracle to find."""

    class Faulty(Connection):
        def receive_data(self, data: bytes) -> list[Event]:
            events = super().receive_data(data)
            if self.parameters is not None:
                fault(self, events)
            return events

    return lambda session, role: session.connection(role, Faulty)


def raise_struct_error(conn: Connection, events: list[Event]) -> None:
    raise struct.error("planted")


def test_every_recorded_end_replays_its_link_to_the_end(corpus: Corpus) -> None:
    """A fresh end fed its script delivers what the peer sent and closes: mutations start from a whole link."""
    for session in corpus.sessions:
        for role in Role:
            result = run(corpus, Input(session.name, role, session.scripts[role]))
            assert (result.findings, result.outcome) == ([], "CLOSED"), (session.name, role)


def test_a_clean_end_holds_little_and_a_hoarding_one_is_caught(corpus: Corpus) -> None:
    session = corpus.sessions[0]
    conn = session.connection(Role.CLIENT)
    for step in session.scripts[Role.CLIENT]:
        if not isinstance(step, bytes):
            break  # the handshake is over
        conn.receive_data(step)
    assert conn.parameters is not None and 0 < retained_bytes(conn) < 1024

    def hoard(conn: Connection, events: list[Event]) -> None:
        conn.hoard = [bytearray(MEMORY_BOUND)]  # type: ignore[attr-defined]

    (finding,) = run(corpus, Input(session.name, Role.CLIENT, session.scripts[Role.CLIENT]), connect=planted(hoard)).findings
    assert finding.kind == "memory"


def test_an_exception_other_than_an_isclerror_is_a_finding(corpus: Corpus) -> None:
    session = corpus.sessions[0]
    findings = run(corpus, Input(session.name, Role.SERVER, session.scripts[Role.SERVER]),
                   connect=planted(raise_struct_error)).findings
    assert [(f.kind, f.what) for f in findings] == [("exception", "struct.error")]
    assert findings[0].where.startswith("tests/unit/test_fuzz_harness.py:")
    assert "planted" in findings[0].detail


def test_an_exception_in_a_live_pair_is_a_finding(corpus: Corpus) -> None:
    """Whenever the tap lets the handshake through, the planted fault goes off and is reported."""
    session = corpus.sessions[0]
    findings = [f for seed in range(10) for f in run(corpus, Input(session.name, seed=seed),
                                                   connect=planted(raise_struct_error)).findings]
    assert findings and {(f.kind, f.what) for f in findings} == {("exception", "struct.error")}


def test_a_slow_call_is_a_finding(corpus: Corpus) -> None:
    session = corpus.sessions[0]
    findings = run(corpus, Input(session.name, Role.CLIENT, session.scripts[Role.CLIENT]),
                   connect=planted(lambda conn, events: time.sleep(0.02)), slow=0.01).findings
    assert {(f.kind, f.what) for f in findings} == {("slow", "receive_data")}


def test_a_forged_delivery_is_a_finding(corpus: Corpus) -> None:
    session = session_of(corpus, Profile.HARDENED, Encryption.DES_CBC, Mac.DES_MAC)

    def forge(conn: Connection, events: list[Event]) -> None:
        events.append(MessageReceived(b"never sent"))

    (finding,) = run(corpus, Input(session.name, Role.CLIENT, session.scripts[Role.CLIENT]), connect=planted(forge)).findings
    assert finding.kind == "forged delivery"


def test_what_may_arrive_depends_on_what_the_suite_promises(corpus: Corpus) -> None:
    def finding(suite: tuple[Profile, Encryption, Mac], *timeline: bytes | object) -> bool:
        """Whether the server meeting ``timeline`` (bytes: a message received) is a finding."""
        events = [MessageReceived(e) if isinstance(e, bytes) else e for e in timeline]
        return forged(events, Role.SERVER, session_of(corpus, *suite), corpus) is not None

    def peer(suite: tuple[Profile, Encryption, Mac]) -> tuple[bytes, ...]:
        return session_of(corpus, *suite).sent[Role.CLIENT]

    hardened = Profile.HARDENED, Encryption.DES_CBC, Mac.DES_MAC
    m0, m1 = peer(hardened)[:2]
    assert not finding(hardened, m0, m1)
    assert finding(hardened, m1, m0) and finding(hardened, m0, m0) and finding(hardened, b"x")
    this = session_of(corpus, *hardened)
    elsewhere = next(s for s in corpus.sessions if s.suite == this.suite and s is not this)
    assert finding(hardened, elsewhere.sent[Role.CLIENT][0])  # hardened binds keys to the link

    v100 = Profile.V100, Encryption.DES_CBC, Mac.MD5
    assert not finding(v100, peer(v100)[1], peer(v100)[1])  # V1.00 replays are documented
    assert finding(v100, bytes(len(peer(v100)[0])))

    malleable = Profile.V100, Encryption.DES_CBC, Mac.DES_MAC
    altered = bytes(len(peer(malleable)[0]))
    assert not finding(malleable, altered)  # the documented first-message flaw
    assert not finding(malleable, MessageSent(8), altered)  # accepted, but nothing sealed yet
    assert finding(malleable, peer(malleable)[0], altered) and finding(malleable, SEALED, altered)
    assert finding(malleable, bytes(len(altered) + 1))

    assert not finding((Profile.HARDENED, Encryption.DES_CBC, Mac.NONE), b"anything")  # no MAC, no promise


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 10**6))
def test_an_input_is_made_from_its_seed_and_number_alone(seed: int, index: int) -> None:
    c = campaign.corpus()
    inp = campaign.make_input(c, seed, index)
    assert campaign.make_input(c, seed, index) == inp
    assert Input.from_json(inp.to_json()) == inp


def test_findings_are_counted_once_each_and_saved_to_replay(corpus: Corpus, tmp_path: Path) -> None:
    tally = campaign.fuzz(7, 0, 40, float("inf"), connect=planted(raise_struct_error))
    assert tally.inputs == 40
    (example,) = tally.found.values()
    assert 1 < example.hits < 40  # every input that completed a handshake
    ((saved, path),) = campaign.save(tmp_path, 7, tally)
    assert saved is example
    (again,) = campaign.replay(path, connect=planted(raise_struct_error))
    assert again.key == example.finding.key
    assert campaign.replay(path) == []  # the real engine


def test_a_small_campaign_runs_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = campaign.main(["--inputs", "3000", "--jobs", "1", "--seed", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "inputs run:  3000 (" in out and "inputs/s" in out and "wall time:" in out
    found = sorted(tmp_path.glob("finding-*.json"))
    assert status == (1 if found else 0), out
