"""Handshake latency: ISCL on SoftHSM2 and on virtual IC cards in each wire profile, Python `ssl` TLS 1.3
with mutual authentication, plain TCP.

Each figure is the time from `connect()` until both ends have authenticated each other: ISCL's
connect returns after the server's last handshake message; the TLS and TCP servers send one byte
once their side is done (for TLS 1.3, after verifying the client's certificate and Finished).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import Section, log, median, percentile
from benchmarks.loopback import LoopbackServers
from iscl_hsm.engine import Profile

SUITE = "des-cbc/des-mac"
TLS = "Python ssl TLS 1.3, mutual (client and server certificates, RSA 2048)"
TCP = "plain TCP connect"


def token_label(profile: Profile) -> str:
    return f"ISCL {profile.value}, SoftHSM2 token ({SUITE})"


def card_label(profile: Profile) -> str:
    keys = ", session keys" if profile is Profile.V100 else ""
    return f"ISCL {profile.value}, virtual IC card (pcscd + vpcd, {SUITE}{keys})"


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
                      [("median_ms", "median ms"), ("p99_ms", "p99 ms"), ("per_s", "handshakes/s, one at a time"),
                       ("vs_tls", "÷ TLS 1.3 mutual")])  # fmt: skip
    kinds: dict[str, Callable[[], Any]] = {
        **{token_label(p): _connector(servers, p) for p in servers.profiles},
        TLS: servers.tls,
        TCP: servers.tcp,
    }
    samples: dict[str, list[list[float]]] = {name: [] for name in kinds}
    for round_number in range(rounds):
        log(f"handshake: round {round_number + 1}/{rounds}")
        for name, connect in kinds.items():
            samples[name].append(_timed(connect, count))
    for name, runs in samples.items():
        _add(section, name, runs, samples[TLS])
    section.notes.append(
        f"Median and p99 of {count} handshakes per run, then the median over {rounds} runs. Every kind runs"
        " in the same rounds, in turn, against servers in their own processes; '÷ TLS 1.3 mutual' is each"
        " round's median over the TLS median of the same round (both ends present and verify a certificate)."
    )
    if card:
        _card_rows(section, servers.profiles, rounds, count)
    else:
        for profile in servers.profiles:
            section.unavailable(card_label(profile), "left out (--no-card)")
    return section


def _connector(servers: LoopbackServers, profile: Profile) -> Callable[[], Any]:
    return lambda: servers.iscl(profile, SUITE)


def _add(section: Section, name: str, runs: list[list[float]], tls: list[list[float]] | None = None) -> None:
    medians = [median(r) for r in runs]
    figures = {"median_ms": median(medians) * 1e3, "p99_ms": median([percentile(r, 0.99) for r in runs]) * 1e3,
               "per_s": 1 / median(medians)}
    if tls is not None:
        figures["vs_tls"] = median([m / median(t) for m, t in zip(medians, tls, strict=True)])
    section.add(name, **figures)


def _card_rows(section: Section, profiles: Sequence[Profile], rounds: int, count: int) -> None:
    """Virtual cards through a private pcscd (root only); rows saying why when that cannot run."""
    reason = _card_unavailable()
    if reason:
        for profile in profiles:
            section.unavailable(card_label(profile), reason)
        return
    from benchmarks import card  # needs pyscard

    runs: dict[Profile, list[list[float]]] = {profile: [] for profile in profiles}
    with (tempfile.TemporaryDirectory(prefix="iscl-bench-card-") as directory,
          card.virtual_cards(Path(directory)) as client_card):
        for round_number in range(rounds):
            log(f"handshake: virtual card round {round_number + 1}/{rounds}")
            for profile in profiles:
                times, _, _ = card.handshakes(client_card, card.link_config(profile, SUITE), count + card.WARM_UP)
                runs[profile].append(times)
    for profile in profiles:
        _add(section, card_label(profile), runs[profile])
    section.notes.append(
        "The virtual card answers in about 0.2 ms per APDU; a real card takes 10 to 300 ms per command,"
        " which `python3 benchmarks/card.py` turns into an estimate for real cards. A card never gives a key"
        " out, so its V1.00 row uses unique session keys; its rounds run after the others, so it has no ratio"
        " to TLS."
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
