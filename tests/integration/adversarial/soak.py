"""Soak: many C-STOREs through a gateway pair, a share of their associations with a fault.

    python3 -m tests.integration.adversarial.soak --stores 10000 --fault-share 0.1

Each store is one DCMTK storescu run with one new small object (one association, one ISCL link);
``--workers`` of them run at once against each pair (one pair per profile). The proxy between the
tunnels gives each link, with probability ``--fault-share``, one fault of a random kind at a random
frame position and direction (a seeded generator: ``--seed``). Every object storescu reports stored
must be on disk with the very data set sent, and every other one must be reported as a failure:

* *lost*: reported stored (its C-STORE response said Success), and not on disk;
* *false success*: reported stored, and on disk with other data (or any object on disk that is not
  what was sent);
* *stored, reported failed*: on disk as sent, but storescu failed (the response or the release was
  cut): harmless, the sender sends it again.

The run fails (exit 1) unless lost and false successes are both 0 and no store hung. `make soak`
runs the full size; tests/integration/adversarial/test_soak.py a few dozen stores in `make test`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from iscl_hsm.engine import Profile

from ..conftest import Hospitals, make_hospitals, make_softhsm
from ..proxy import Link
from .design import GATEWAY_FRAMES, fault
from .faults import Fault, Kind
from .gateway import GATEWAY_SUITES, ISCL_CODE, GatewayPair, Store, link_results


@dataclass
class Figures:
    """What a soak run reports. An object is *reported stored* when storescu saw its C-STORE response
    say Success (a failure after it, such as a cut release, is counted apart). A failure is reported
    when storescu exits non-zero or prints an error line: it exits 0 after an aborted association."""

    stores_attempted: int = 0
    reported_stored: int = 0
    verified_identical: int = 0
    """Reported stored, and on disk with the very data set sent."""
    failures_reported: int = 0
    """No Success response, and storescu reported a failure."""
    stored_but_reported_failed: int = 0
    released_badly: int = 0
    """Reported stored, then a failure reported (the association's release was cut)."""
    unreported: int = 0
    """Neither a Success response nor a failure reported: must be 0."""
    lost: int = 0
    false_successes: int = 0
    hung: int = 0
    faults_planned: int = 0
    faults_injected: dict[str, int] = field(default_factory=dict)
    """Faults that met their frame, by kind (a fault past the end of a short link never fires)."""
    wall_seconds: float = 0.0
    tunnel_lines: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.false_successes == 0
            and self.hung == 0
            and self.unreported == 0
            and not self.problems
        )


class Planner:
    """Chooses each link's fault: with probability ``share``, a random kind, direction and position."""

    def __init__(self, share: float, seed: int, session_keys: bool) -> None:
        self._random = random.Random(seed)
        self._share = share
        self._frames = GATEWAY_FRAMES[session_keys]
        self._lock = threading.Lock()
        self.planned: dict[int, Fault] = {}

    def __call__(self, link: Link) -> Fault | None:
        with self._lock:
            if self._random.random() >= self._share:
                return None
            kind = self._random.choice(list(Kind))
            direction = self._random.choice(("c2s", "s2c"))
            chosen = fault(kind, direction, self._random.randrange(self._frames[direction]))
            self.planned[link.number] = chosen
            return chosen


def soak(
    hospitals: Hospitals,
    root: Path,
    stores: int,
    share: float,
    *,
    profiles: tuple[Profile, ...] = tuple(Profile),
    workers: int = 8,
    seed: int = 1,
    progress: bool = False,
) -> Figures:
    """Run ``stores`` stores, split evenly across one pair per profile (the gateway's default suite,
    DES-CBC + DES-MAC with key 1), and count what came of them."""
    suite = GATEWAY_SUITES[0]
    figures = Figures()
    pairs = [GatewayPair(hospitals, profile, suite, root / profile.value) for profile in profiles]
    planners = []
    for n, pair in enumerate(pairs):
        planner = Planner(share, seed + n, suite.session_keys)
        pair.plan = planner
        planners.append(planner)
    numbers = itertools.count()
    outcomes: list[Store] = []
    lock = threading.Lock()
    started = time.monotonic()

    def one(pair: GatewayPair) -> None:
        number = next(numbers)
        store = pair.store(root / "objects" / str(number), lines=False)
        with lock:
            outcomes.append(store)
            if progress and len(outcomes) % 500 == 0:
                print(
                    f"soak: {len(outcomes)} of {stores} stores, {time.monotonic() - started:.0f} s",
                    file=sys.stderr,
                )

    try:
        with ThreadPoolExecutor(workers * len(pairs)) as pool:
            for result in [pool.submit(one, pairs[i % len(pairs)]) for i in range(stores)]:
                result.result()
    finally:
        figures.wall_seconds = round(time.monotonic() - started, 1)
        for pair in pairs:
            figures.problems += pair.stop()
    count(figures, outcomes, pairs, planners)
    return figures


def count(figures: Figures, outcomes: list[Store], pairs: list[GatewayPair], planners: list[Planner]) -> None:
    """Fill in ``figures`` from each store's outcome, the faults that fired and the tunnels' lines."""
    injected: Counter[str] = Counter()
    for pair in pairs:
        for handler in pair.handlers.values():
            if handler.hit is not None:
                injected[handler.fault.kind.value] += 1
    figures.faults_planned = sum(len(p.planned) for p in planners)
    figures.faults_injected = dict(sorted(injected.items()))
    for store in outcomes:
        figures.stores_attempted += 1
        if store.status is None:
            figures.hung += 1
            continue
        if store.reported_stored:
            figures.reported_stored += 1
            figures.released_badly += store.reported_failed
            if store.stored is None:
                figures.lost += 1
            elif store.identical:
                figures.verified_identical += 1
        elif store.reported_failed:
            figures.failures_reported += 1
            figures.stored_but_reported_failed += store.identical
        else:
            figures.unreported += 1
        if store.stored is not None and not store.identical:
            figures.false_successes += 1  # whatever storescu said: a changed object is on disk
    if figures.failures_reported + figures.released_badly > sum(injected.values()):
        figures.problems.append("more stores failed than faults met a frame: some failed without a fault")
    lines: Counter[str] = Counter()
    for pair in pairs:
        for tunnel in (pair.client, pair.server):
            for result in link_results(tunnel):
                aborted = result.startswith("aborted: ") and ISCL_CODE.search(result)
                lines["closed" if result == "closed" else "aborted" if aborted else "malformed"] += 1
    figures.tunnel_lines = dict(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m tests.integration.adversarial.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--stores", type=int, default=10_000)
    parser.add_argument("--fault-share", type=float, default=0.1)
    parser.add_argument(
        "--workers", type=int, default=8, help="stores at once per pair (default: %(default)s)"
    )
    parser.add_argument("--profiles", default="v1.00,hardened", help="one pair each (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--keep", type=Path, help="work in this folder and keep it (default: a temporary one)"
    )
    args = parser.parse_args(argv)
    profiles = tuple(Profile(name) for name in args.profiles.split(","))
    with tempfile.TemporaryDirectory(prefix="iscl-soak-") as temporary:
        root = args.keep or Path(temporary)
        root.mkdir(parents=True, exist_ok=True)
        softhsm = make_softhsm(root / "softhsm", tokens=3)
        os.environ["SOFTHSM2_CONF"] = softhsm.env["SOFTHSM2_CONF"]  # before the module is loaded here
        (root / "pins").mkdir(exist_ok=True)
        hospitals = make_hospitals(softhsm, root / "pins")
        figures = soak(
            hospitals,
            root,
            args.stores,
            args.fault_share,
            profiles=profiles,
            workers=args.workers,
            seed=args.seed,
            progress=True,
        )
    report = asdict(figures)
    report["problems"] = report["problems"][:20]
    print(json.dumps(report, indent=2))
    return 0 if figures.ok else 1


if __name__ == "__main__":
    sys.exit(main())
