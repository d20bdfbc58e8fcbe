"""The fuzz campaign: ``python3 -m tests.fuzz.campaign --inputs 1000000`` (``make fuzz``).

Input number i of a campaign is made from ``Random(f"{seed}/{i}")`` alone, so a campaign's inputs do
not depend on how many workers ran it, and any input can be made again. Workers run batches of
consecutive inputs; the parent merges what they found, writes one reproducer per distinct finding
(the first input that showed it) and prints the count, the time and the findings. The exit status
is 1 if anything was found.

``--replay FILE`` runs a reproducer again and prints the finding in full (a traceback, for an exception).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from random import Random

from iscl_hsm.engine import Role

from .corpus import Connect, Corpus
from .mutate import mutate
from .oracle import MEMORY_BOUND, SLOW, Finding, Input, run

LIVE_SHARE = 0.15
"""Inputs run as a live pair with a tap: fewer, since each costs two ends and teaches less per call."""
BATCH = 1000
PROGRESS_EVERY = 30.0

_corpus: Corpus | None = None


def corpus() -> Corpus:
    """This process's corpus, recorded once (0.4 s)."""
    global _corpus
    if _corpus is None:
        _corpus = Corpus()
    return _corpus


def make_input(c: Corpus, seed: int, index: int) -> Input:
    """Input ``index`` of campaign ``seed``, made from those two alone: any input can be made again."""
    rng = Random(f"{seed}/{index}")
    session = rng.choice(c.sessions)
    if rng.random() < LIVE_SHARE:
        return Input(session.name, seed=rng.getrandbits(64))
    role = rng.choice(list(Role))
    donors = c.kin(session.suite) if rng.random() < 0.5 else c.streams  # kin: messages that could verify
    return Input(session.name, role, tuple(mutate(rng, session.scripts[role], donors)))


@dataclass
class Example:
    """A distinct finding: the first input that showed it, and how often it was met."""

    finding: Finding
    index: int
    input: Input
    hits: int = 1


@dataclass
class Tally:
    """What a batch, or the whole campaign, ran and found."""

    inputs: int = 0
    live: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    slowest: float = 0.0
    held: int = 0
    found: dict[tuple[str, str, str], Example] = field(default_factory=dict)

    def add(self, finding: Finding, index: int, inp: Input, hits: int = 1) -> None:
        seen = self.found.get(finding.key)
        if seen is None:
            self.found[finding.key] = Example(finding, index, inp, hits)
            return
        seen.hits += hits
        if index < seen.index:  # the same example whatever order the batches finish in
            seen.finding, seen.index, seen.input = finding, index, inp

    def merge(self, other: Tally) -> None:
        self.inputs += other.inputs
        self.live += other.live
        self.outcomes.update(other.outcomes)
        self.slowest = max(self.slowest, other.slowest)
        self.held = max(self.held, other.held)
        for ex in other.found.values():
            self.add(ex.finding, ex.index, ex.input, ex.hits)


def fuzz(seed: int, start: int, stop: int, deadline: float, slow: float = SLOW, connect: Connect | None = None) -> Tally:
    """Run inputs ``start`` .. ``stop`` - 1 of campaign ``seed``, stopping early at ``deadline`` (time.time())."""
    c = corpus()
    tally = Tally()
    for index in range(start, stop):
        if time.time() > deadline:
            break
        inp = make_input(c, seed, index)
        result = run(c, inp, connect=connect, slow=slow)
        tally.inputs += 1
        tally.live += inp.role is None
        tally.outcomes[result.outcome] += 1
        tally.slowest = max(tally.slowest, result.slowest)
        tally.held = max(tally.held, result.held)
        for finding in result.findings:
            tally.add(finding, index, inp)
    return tally


def campaign(seed: int, inputs: float, seconds: float, jobs: int, slow: float) -> Tally:
    """Run up to ``inputs`` inputs for up to ``seconds``, in ``jobs`` processes (1: this one)."""
    began = time.time()
    deadline = began + seconds
    total = Tally()
    next_start = 0
    shown = began

    def next_batch() -> tuple[int, int] | None:
        nonlocal next_start
        if next_start >= inputs or time.time() > deadline:
            return None
        start, next_start = next_start, int(min(next_start + BATCH, inputs))
        return start, next_start

    def merged(tally: Tally) -> None:
        nonlocal shown
        total.merge(tally)
        if time.time() - shown > PROGRESS_EVERY:
            shown = time.time()
            elapsed = shown - began
            print(f"  {total.inputs} inputs, {total.inputs / elapsed:.0f}/s, {len(total.found)} findings", flush=True)

    if jobs == 1:
        while (batch := next_batch()) is not None:
            merged(fuzz(seed, *batch, deadline, slow))
        return total
    with ProcessPoolExecutor(jobs, initializer=corpus) as pool:
        running: set[Future[Tally]] = set()
        while True:
            while len(running) < 2 * jobs and (batch := next_batch()) is not None:
                running.add(pool.submit(fuzz, seed, *batch, deadline, slow))
            if not running:
                return total
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                merged(future.result())


def save(out: Path, seed: int, tally: Tally) -> list[tuple[Example, Path]]:
    """One reproducer per distinct finding, most frequent first."""
    saved = []
    for n, ex in enumerate(sorted(tally.found.values(), key=lambda e: -e.hits), 1):
        path = out / f"finding-{n:02d}-{ex.finding.kind.replace(' ', '-')}.json"
        path.write_text(json.dumps({
            "finding": {"kind": ex.finding.kind, "what": ex.finding.what, "where": ex.finding.where,
                        "detail": ex.finding.detail, "hits": ex.hits},
            "campaign": {"seed": seed, "input": ex.index},
            "input": ex.input.to_json(),
        }, indent=1) + "\n")
        saved.append((ex, path))
    return saved


def report(args: argparse.Namespace, tally: Tally, elapsed: float, out: Path) -> None:
    rate = tally.inputs / elapsed if elapsed else 0.0
    print(f"inputs run:  {tally.inputs} ({tally.inputs - tally.live} streams into a fresh end, {tally.live} live pairs)")
    print(f"wall time:   {elapsed:.1f} s ({args.jobs} jobs)")
    print(f"rate:        {rate:.0f} inputs/s")
    print(f"slowest call: {tally.slowest * 1000:.1f} ms (reported above {args.slow} s);"
          f" most held: {tally.held} bytes (bound {MEMORY_BOUND})")
    print("how inputs ended:", ", ".join(f"{name} {n}" for name, n in tally.outcomes.most_common(12)))
    print(f"findings:    {len(tally.found)} distinct")
    for ex, path in save(out, args.seed, tally):
        print(f"  {ex.finding} ({ex.hits} inputs)\n    {ex.finding.detail.strip().splitlines()[-1]}\n    reproducer: {path}")
        print(f"    run again: {sys.executable} -m tests.fuzz.campaign --replay {path}")


def replay(path: Path, slow: float = SLOW, connect: Connect | None = None) -> list[Finding]:
    """Run a saved input again; return (and print) what it shows now."""
    inp = Input.from_json(json.loads(path.read_text())["input"])
    findings = run(corpus(), inp, connect=connect, slow=slow).findings
    for finding in findings:
        print(f"{finding}\n{finding.detail}")
    if not findings:
        print("no finding: the input runs clean now")
    return findings


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m tests.fuzz.campaign", description=__doc__.splitlines()[0])
    p.add_argument("--inputs", type=int, help="inputs to run (default 1000000, or no limit with --seconds)")
    p.add_argument("--seconds", type=float, help="stop after this long")
    p.add_argument("--seed", type=int, default=0, help="campaign seed (default 0)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: every core)")
    p.add_argument("--out", type=Path, help="where reproducers go (default: a new temporary directory)")
    p.add_argument("--slow", type=float, default=SLOW, help=f"report an engine call slower than this (s, default {SLOW})")
    p.add_argument("--replay", type=Path, help="run one saved reproducer again and show its finding")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.replay is not None:
        return 1 if replay(args.replay, args.slow) else 0
    inputs = args.inputs if args.inputs is not None else (float("inf") if args.seconds else 1_000_000)
    out = args.out or Path(tempfile.mkdtemp(prefix="iscl-fuzz-"))
    out.mkdir(parents=True, exist_ok=True)
    c = corpus()
    print(f"iscl fuzz: seed {args.seed}, {args.jobs} jobs, {len(c.sessions)} recorded links"
          f" ({len(c.frames)} frames), reproducers in {out}", flush=True)
    began = time.time()
    tally = campaign(args.seed, inputs, args.seconds or float("inf"), args.jobs, args.slow)
    report(args, tally, time.time() - began, out)
    return 1 if tally.found else 0


if __name__ == "__main__":
    sys.exit(main())
