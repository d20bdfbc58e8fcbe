"""Handshake latency: ISCL on SoftHSM2, ISCL on virtual IC cards, Python `ssl` TLS 1.3, plain TCP.

Each figure is the time from `connect()` until both ends have authenticated each other: ISCL's
connect returns after the server's last handshake message; the TLS and TCP servers send one byte
once their side is done (for TLS 1.3, after verifying the client's certificate and Finished).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import Section, log, median, percentile
from benchmarks.loopback import LoopbackServers

CARD_SUITE = "des-cbc/des-mac"


def _timed(connect: Callable[[], Any], count: int) -> list[float]:
    """Seconds per connect, ``count`` times (each connection closed, untimed, before the next)."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        link = connect()
        times.append(time.perf_counter() - started)
        link.close()
    return times


def run(servers: LoopbackServers, rounds: int, count: int, card: bool) -> Section:
    section = Section("handshake", "Handshake latency over loopback (connect until both ends are authenticated)",
                      [("median_ms", "median ms"), ("p99_ms", "p99 ms"), ("per_s", "handshakes/s, one at a time")])
    kinds: dict[str, Callable[[], Any]] = {
        f"ISCL, SoftHSM2 token ({CARD_SUITE})": lambda: servers.iscl(CARD_SUITE),
        "Python ssl TLS 1.3, RSA 2048, mutual": servers.tls,
        "plain TCP connect": servers.tcp,
    }
    samples: dict[str, list[list[float]]] = {name: [] for name in kinds}
    for round_number in range(rounds):
        log(f"handshake: round {round_number + 1}/{rounds}")
        for name, connect in kinds.items():
            samples[name].append(_timed(connect, count))
    for name, runs in samples.items():
        _add(section, name, runs)
    section.notes.append(
        f"Median and p99 of {count} handshakes per run, then the median over {rounds} runs. All three "
        "kinds run in the same rounds, in turn, against servers in their own processes."
    )
    if card:
        _card_row(section, rounds, count)
    else:
        section.unavailable("ISCL, virtual IC card (pcscd + vpcd)", "left out (--no-card)")
    return section


def _add(section: Section, name: str, runs: list[list[float]]) -> None:
    medians = [median(r) for r in runs]
    section.add(name, median_ms=median(medians) * 1e3, p99_ms=median([percentile(r, 0.99) for r in runs]) * 1e3,
                per_s=1 / median(medians))


def _card_row(section: Section, rounds: int, count: int) -> None:
    """Virtual cards through a private pcscd (root only); a row saying why when that cannot run."""
    label = "ISCL, virtual IC card (pcscd + vpcd, des-cbc/des-mac)"
    reason = _card_unavailable()
    if reason:
        section.unavailable(label, reason)
        return
    from benchmarks import card  # needs pyscard

    runs = []
    with (tempfile.TemporaryDirectory(prefix="iscl-bench-card-") as directory,
          card.virtual_cards(Path(directory)) as client_card):
        for round_number in range(rounds):
            log(f"handshake: virtual card round {round_number + 1}/{rounds}")
            times, _, _ = card.handshakes(client_card, card.SUITES[CARD_SUITE], count + card.WARM_UP)
            runs.append(times)
    _add(section, label, runs)
    section.notes.append(
        "The virtual card answers in about 0.2 ms per APDU; a real card takes 10 to 300 ms per command,"
        " which `python3 benchmarks/card.py` turns into an estimate for real cards."
    )


def _card_unavailable() -> str:
    from iscl_hsm.cardsim.daemon import missing_components

    if os.geteuid() != 0:
        return "needs root (a private pcscd in its own mount namespace)"
    missing = missing_components()
    if missing:
        return f"missing: {', '.join(missing)}"
    try:
        import smartcard  # noqa: F401
    except ImportError:
        return "pyscard is not installed (pip install 'iscl-hsm[card]')"
    return ""
