"""Fixtures of the adversarial suite: the CLI campaign with its long-lived accept-many servers, and the
gateway campaign with its long-lived tunnel pairs."""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import Hospitals
from .campaign import Campaign, selected
from .cli import AcceptManyServer, CliCase, CliResult, run_case
from .gateway import GATEWAY_SUITES, GatewayCase, GatewayPair, Store
from .oracle import Verdict
from .printouts import strays

WORKERS = int(os.environ.get("ISCL_ADVERSARIAL_WORKERS", "6"))
"""Cases run at once. Most of a case is waiting for a process to start or a timeout to run out."""


class Servers:
    """One `iscl server --accept-many` per profile and suite, started when a case first needs it."""

    def __init__(self, hospitals: Hospitals, root: Path) -> None:
        self._hospitals = hospitals
        self._root = root
        self._lock = threading.Lock()
        self._locks: dict[object, threading.Lock] = {}
        self.running: dict[object, AcceptManyServer] = {}

    def of(self, case: CliCase) -> AcceptManyServer:
        key = (case.profile, case.suite)
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self.running:
                self.running[key] = AcceptManyServer(
                    self._hospitals, case, self._root / f"{case.profile.value}-{case.suite}"
                )
            return self.running[key]

    def stop(self) -> list[str]:
        """Stop every server; what went wrong (a link still open, a stray traceback)."""
        problems = []
        for key, server in self.running.items():
            status, lines = server.stop()
            summary = lines[-1] if lines else ""
            if status not in (0, 1) or ", 0 aborted" not in summary:
                problems.append(f"server {key}: exit {status}, {summary!r} (a link was still open)")
            if stray := strays(lines):
                problems.append(f"server {key}: {stray}")
        return problems


def write_summary(path: Path, results: list[CliResult]) -> None:
    """What the faults did, by kind, and the longest an end took: for docs/adversarial.md."""
    outcomes: dict[str, Counter[str]] = {}
    longest = 0.0
    for result in results:
        kind = "no-fault" if result.case.fault is None else result.case.fault.kind.value
        outcomes.setdefault(kind, Counter())[Verdict(result).outcome()] += 1
        longest = max([longest, *(end.seconds for end in result.ends())])
    summary = {
        "cases": len(results),
        "longest_end_seconds": round(longest, 1),
        "outcomes": {kind: dict(counts.most_common()) for kind, counts in sorted(outcomes.items())},
    }
    path.write_text(json.dumps(summary, indent=1))


@pytest.fixture(scope="session")
def cli_campaign(
    request: pytest.FixtureRequest,
    hospitals: Hospitals,
    tmp_path_factory: pytest.TempPathFactory,
    gateway_campaign: Campaign[GatewayCase, Store],
) -> Iterator[Campaign[CliCase, CliResult]]:
    """Runs the selected CLI cases, WORKERS at a time, along with the gateway's; at the end every
    accept-many server must stop with no link left open."""
    root = tmp_path_factory.mktemp("adversarial-cli")
    servers = Servers(hospitals, root / "servers")
    numbers = itertools.count()

    def run(case: CliCase) -> CliResult:
        server = None if case.two_way else servers.of(case)
        return run_case(case, hospitals, root / f"case-{next(numbers)}", server)

    campaign = Campaign(run, selected(request.session, CliCase), WORKERS)
    campaign.companions.append(gateway_campaign)
    gateway_campaign.companions.append(campaign)
    yield campaign
    campaign.close()
    write_summary(root / "summary.json", campaign.results())
    problems = servers.stop()
    assert not problems, "\n".join(problems)


class Pairs:
    """One gateway pair per profile and suite, started when a case first needs it; a pair runs one
    store at a time (its link lines are matched by order), different pairs run at once."""

    def __init__(self, hospitals: Hospitals, root: Path) -> None:
        self._hospitals = hospitals
        self._root = root
        self._lock = threading.Lock()
        self._locks: dict[object, threading.Lock] = {}
        self.running: dict[object, GatewayPair] = {}

    def store(self, case: GatewayCase, work: Path) -> Store:
        key = (case.profile, case.suite)
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self.running:
                folder = self._root / f"{case.profile.value}-{case.suite}"
                self.running[key] = GatewayPair(self._hospitals, case.profile, case.suite, folder)
            return self.running[key].store(work, case.fault)

    def stop(self) -> list[str]:
        return [f"pair {key}: {problem}" for key, pair in self.running.items() for problem in pair.stop()]


@pytest.fixture(scope="session")
def gateway_campaign(
    request: pytest.FixtureRequest, hospitals: Hospitals, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Campaign[GatewayCase, Store]]:
    """Runs the selected gateway cases, one pair's at a time and the pairs at once; at the end every
    tunnel must stop cleanly, without a traceback."""
    root = tmp_path_factory.mktemp("adversarial-gateway")
    pairs = Pairs(hospitals, root / "pairs")
    numbers = itertools.count()

    def run(case: GatewayCase) -> Store:
        return pairs.store(case, root / f"case-{next(numbers)}")

    campaign = Campaign(run, selected(request.session, GatewayCase), 2 * len(GATEWAY_SUITES))
    yield campaign
    campaign.close()
    problems = pairs.stop()
    assert not problems, "\n".join(problems)
