"""Record-layer throughput: each ISCL suite in each wire profile beside plain TCP, Python `ssl` TLS 1.3
and `openssl speed`.

A round measures every column back to back, so each ratio compares two figures taken seconds apart;
the tables show medians over rounds of the figures and of the per-round ratios. A second table
sweeps the message size, one message per send (ISCL message, TLS/TCP frame).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

from benchmarks.common import SUITES, Section, log, median, openssl_speed, openssl_speed_command, suite_label
from benchmarks.links import framed_rate, iscl_rate
from benchmarks.loopback import LoopbackServers
from iscl_hsm.engine import Profile

MESSAGE = 1 << 20
SWEEP_SUITES = ("none/md5", "des-cbc/des-mac")
MB = 1e6


def _transports(servers: LoopbackServers, suites: Sequence[str]) -> dict[str, Callable[[bytes, float], float]]:
    """Name -> rate(payload, seconds) in bytes/s; each call opens a new link (untimed) first.

    ISCL rows come profile by profile ("ISCL v1.00 des-cbc/md5", see :func:`iscl_name`).
    """
    rates: dict[str, Callable[[bytes, float], float]] = {
        "plain TCP": lambda payload, seconds: framed_rate(servers.tcp(), payload, seconds),
        "TLS 1.3": lambda payload, seconds: framed_rate(servers.tls(), payload, seconds),
    }
    for profile in servers.profiles:
        for suite in suites:
            rates[iscl_name(profile, suite)] = functools.partial(_iscl_rate, servers, profile, suite)
    return rates


def iscl_name(profile: Profile, suite: str) -> str:
    """The row of ``suite`` in ``profile``, in both tables (benchmarks/headline.py finds it by this)."""
    return f"ISCL {suite_label(profile, suite)}"


def _iscl_rate(servers: LoopbackServers, profile: Profile, suite: str, payload: bytes, seconds: float) -> float:
    return iscl_rate(servers.iscl(profile, suite), payload, seconds)


def run_suites(servers: LoopbackServers, rounds: int, seconds: float) -> Section:
    section = Section(
        "throughput", "Record-layer throughput over loopback, 1 MiB messages (MB = 10^6 bytes)",
        [("mb_s", "MB/s"), ("vs_tcp", "÷ plain TCP"), ("vs_tls", "÷ TLS 1.3"),
         ("vs_des", "÷ openssl des-cbc"), ("vs_md5", "÷ openssl md5")],
    )  # fmt: skip
    transports = _transports(servers, list(SUITES))
    payload = os.urandom(MESSAGE)
    per_round: list[dict[str, float]] = []
    for round_number in range(rounds):
        log(f"throughput: round {round_number + 1}/{rounds}")
        figures = {"openssl des-cbc": openssl_speed("des-cbc", 1), "openssl md5": openssl_speed("md5", 1)}
        for name, rate in transports.items():
            figures[name] = rate(payload, seconds)
        per_round.append(figures)
    for name in per_round[0]:
        ratios = {
            key: median([r[name] / r[ref] for r in per_round])
            for key, ref in (("vs_tcp", "plain TCP"), ("vs_tls", "TLS 1.3"), ("vs_des", "openssl des-cbc"),
                             ("vs_md5", "openssl md5"))
        }  # fmt: skip
        section.add(name, mb_s=median([r[name] for r in per_round]) / MB, **ratios)
    for algorithm in ("des-cbc", "md5"):
        section.command(openssl_speed_command(algorithm, 1))
    section.notes.append(
        f"{rounds} rounds of {seconds:g} s per transport; `openssl speed` is one core encrypting (or hashing)"
        " 8 KiB buffers, the ceiling for one direction of a DES-CBC or MD5 link. An ISCL DES-CBC/DES-MAC link"
        " runs DES twice per byte on each side (encrypt and MAC, decrypt and MAC). V1.00 uses encryption key 1"
        " itself as the DES key (read once from the token, run by OpenSSL); hardened derives record keys from"
        " it per link. V1.00's none/md5 is the plain MD5 the SDK sends there (Config allow_unkeyed_md5)."
    )
    return section


def run_sizes(servers: LoopbackServers, rounds: int, seconds: float, sizes: Sequence[int]) -> Section:
    section = Section(
        "sizes", "Throughput against message size (MB/s, one message per send)",
        [(_size_key(size), _size_name(size)) for size in sizes],
    )
    transports = _transports(servers, SWEEP_SUITES)
    payloads = {size: os.urandom(size) for size in sizes}
    results: dict[str, dict[int, list[float]]] = {name: {size: [] for size in sizes} for name in transports}
    for round_number in range(rounds):
        log(f"sizes: round {round_number + 1}/{rounds}")
        for name, rate in transports.items():
            for size in sizes:
                results[name][size].append(rate(payloads[size], seconds))
    for name, by_size in results.items():
        medians = {size: median(values) / MB for size, values in by_size.items()}
        section.add(name, **{_size_key(size): value for size, value in medians.items()})
        section.series[name] = {"x": [float(size) for size in sizes], "y": list(medians.values())}
    section.notes.append(
        f"{rounds} rounds; each point sends for {seconds:g} s (at least one message) on a new link and stops"
        " when the receiver has the last byte. Small ISCL messages wait for the peer's acceptance of each"
        " message (a round trip), large ones are limited by DES."
    )
    return section


def _size_key(size: int) -> str:
    return f"b{size}"


def _size_name(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
