"""Fixtures of the adversarial suite: the CLI campaign with its long-lived accept-many servers, and the
gateway campaign with its long-lived tunnel pairs."""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytest

from ..conftest import Hospitals
from .campaign import Campaign, selected
from .cli import AcceptManyServer, CliCase, CliResult, run_case
from .gateway import GATEWAY_SUITES, GatewayCase, GatewayPair, Store
from .oracle import Verdict
from .printouts import strays

WORKERS = int(os.environ.get("ISCL_ADVERSARIAL_WORKERS", "6"))
"""Cases run at once. Most of a case is waiting for a process to start or a timeout to run out."""
T = TypeVar("T")


class PerSuite(Generic[T]):
    """One long-lived ``T`` per profile and suite (an accept-many server, a gateway pair), made by
    ``start(case, folder)`` when a case first needs it; those of different suites start at once."""

    def __init__(self, start: Callable[[Any, Path], T], root: Path) -> None:
        self._start = start
        self._root = root
        self._lock = threading.Lock()
        self._locks: dict[object, threading.RLock] = {}
        self.running: dict[object, T] = {}

    def lock(self, case: CliCase | GatewayCase) -> threading.RLock:
        """The lock of the case's suite: held while its ``T`` starts (and as long as a user wants it alone)."""
        with self._lock:
            return self._locks.setdefault((case.profile, case.suite), threading.RLock())

    def of(self, case: CliCase | GatewayCase) -> T:
        key = (case.profile, case.suite)
        with self.lock(case):
            if key not in self.running:
                self.running[key] = self._start(case, self._root / f"{case.profile.value}-{case.suite}")
            return self.running[key]


def stop_servers(servers: PerSuite[AcceptManyServer]) -> list[str]:
    """Stop every accept-many server; what went wrong (a link still open, a stray traceback)."""
    problems = []
    for key, server in servers.running.items():
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
    servers = PerSuite(lambda case, folder: AcceptManyServer(hospitals, case, folder), root / "servers")
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
    problems = stop_servers(servers)
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="session")
def gateway_campaign(
    request: pytest.FixtureRequest, hospitals: Hospitals, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Campaign[GatewayCase, Store]]:
    """Runs the selected gateway cases, one pair's at a time and the pairs at once; at the end every
    tunnel must stop cleanly, without a traceback."""
    root = tmp_path_factory.mktemp("adversarial-gateway")
    pairs = PerSuite(
        lambda case, folder: GatewayPair(hospitals, case.profile, case.suite, folder), root / "pairs"
    )
    numbers = itertools.count()

    def run(case: GatewayCase) -> Store:
        with pairs.lock(case):  # one store at a time per pair: its link lines are matched by order
            return pairs.of(case).store(root / f"case-{next(numbers)}", case.fault)

    campaign = Campaign(run, selected(request.session, GatewayCase), 2 * len(GATEWAY_SUITES))
    yield campaign
    campaign.close()
    problems = [f"pair {key}: {problem}" for key, pair in pairs.running.items() for problem in pair.stop()]
    assert not problems, "\n".join(problems)
