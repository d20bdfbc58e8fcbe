"""N simultaneous links through one gateway pair (des-cbc/des-mac) per wire profile, beside a stunnel
TLS 1.3 pair and N plain TCP connections.

Each link is a connection from this process to the client tunnel, carried over ISCL (or TLS) to the
server tunnel and forwarded to a sink process. The sink greets every connection with one byte, so the time
from connect() to that byte is the link's set-up through the gateway (TCP, ISCL handshake, forward
connection). Once all N are up the resident memory of both tunnels is read, then every link sends
its share of the payload and the sink acknowledges it; aggregate throughput is all bytes over the
time from the start signal to the last acknowledgement.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import BenchToken, Children, Section, log, median, percentile, resident_kib
from benchmarks.gateway_pair import GatewayPair, gateway_missing
from benchmarks.stunnel_pair import StunnelPair, stunnel_missing
from benchmarks.tls import Credentials
from iscl_hsm.allocator import keep_bulk_buffers
from iscl_hsm.engine import Profile

SUITE = "des-cbc/des-mac"
GREETING, ACK = b"H", b"A"
_LENGTH = struct.Struct("!Q")


def serve_sink(listener: socket.socket) -> None:
    """Sink process: greet each connection, read one length-prefixed payload, acknowledge it."""
    keep_bulk_buffers()

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(GREETING)
            await writer.drain()
            remaining = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))[0]
            while remaining:
                chunk = await reader.read(min(remaining, 1 << 20))
                if not chunk:
                    return
                remaining -= len(chunk)
            writer.write(ACK)
            await writer.drain()
            await reader.read()  # until the client closes
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(one, sock=listener, backlog=1024)
        await server.serve_forever()

    asyncio.run(main())


async def _batch(port: int, count: int, share: int, pids: Sequence[int]) -> tuple[list[float], float, int]:
    """``count`` links at once: (set-up seconds per link, aggregate bytes/s, resident KiB of ``pids``)."""
    go = asyncio.Event()
    setup: list[float] = []
    frame = _LENGTH.pack(share) + bytes(share)
    done: list[float] = []

    async def link() -> None:
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        if await reader.readexactly(1) != GREETING:
            raise RuntimeError("the sink did not greet the link")
        setup.append(time.perf_counter() - started)
        await go.wait()
        writer.write(frame)
        await writer.drain()
        if await reader.readexactly(1) != ACK:
            raise RuntimeError("the sink did not acknowledge the payload")
        done.append(time.perf_counter())
        writer.close()
        await writer.wait_closed()

    tasks = [asyncio.create_task(link()) for _ in range(count)]
    while len(setup) < count:
        await asyncio.sleep(0.005)
        failed = [task for task in tasks if task.done() and task.exception()]
        if failed:
            raise RuntimeError(f"a link failed while {count} were being opened") from failed[0].exception()
    resident = sum(resident_kib(pid) for pid in pids)
    started = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    return setup, count * share / (max(done) - started), resident


def gateway_label(count: int, profile: Profile) -> str:
    return f"N={count}, ISCL gateway {profile.value}"


def stunnel_label(count: int) -> str:
    return f"N={count}, stunnel TLS 1.3 pair"


def plain_label(count: int) -> str:
    return f"N={count}, plain TCP (no gateway)"


Pair = GatewayPair | StunnelPair


def run(children: Children, token: BenchToken, credentials: Credentials, workdir: Path, rounds: int,
        counts: Sequence[int], total_bytes: int, profiles: Sequence[Profile]) -> Section:
    section = Section(
        "concurrency", f"N simultaneous links through one gateway pair ({SUITE}) vs a stunnel TLS 1.3 pair"
        " and plain TCP",
        [("setup_p50_ms", "set-up p50 ms"), ("setup_p99_ms", "set-up p99 ms"), ("all_up_ms", "all up ms"),
         ("all_up_vs_stunnel", "all up ÷ stunnel"), ("mb_s", "aggregate MB/s"),
         ("kib_per_link", "tunnels' RSS KiB per link")],
    )  # fmt: skip
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    children.spawn(serve_sink, listener)
    sink_port = listener.getsockname()[1]
    missing = gateway_missing()
    logs = workdir / "concurrency"
    for count in counts:
        share = max(16 << 10, total_bytes // count)
        starters: dict[str, Callable[[], Pair | None]] = {}
        for profile in profiles:
            if missing:
                section.unavailable(gateway_label(count, profile), missing)
            else:
                starters[gateway_label(count, profile)] = _gateway_starter(children, token, profile, sink_port, logs)
        if reason := stunnel_missing():
            section.unavailable(stunnel_label(count), reason)
        else:
            starters[stunnel_label(count)] = lambda: StunnelPair(children, credentials, sink_port, logs / "stunnel")
        starters[plain_label(count)] = lambda: None
        _measure(section, count, share, rounds, starters, sink_port)
    section.notes.append(
        f"{rounds} rounds per N, every row in turn within each round; p50/p99 of the N set-up times per"
        " round, then the median over rounds. 'all up' is the set-up time of the last of the N links (all"
        " N arrive at once), and '÷ stunnel' that time over the stunnel pair's in the same round. Each"
        f" link sends total/N bytes (total {total_bytes >> 20} MiB, at least 16 KiB per link). RSS per link is"
        " (both tunnels' VmRSS with N links open - after one warm-up link) / N, on a fresh tunnel pair each"
        " round, read before any payload moves (payload buffers come on top while data flows). The client,"
        " both tunnels and the sink share the machine's cores. The stunnel pair authenticates both ends"
        " with RSA 2048 certificates in TLS 1.3 and runs a thread per connection."
    )
    return section


def _gateway_starter(children: Children, token: BenchToken, profile: Profile, sink_port: int, logs: Path
                     ) -> Callable[[], GatewayPair]:
    return lambda: GatewayPair(children, token, profile, SUITE, sink_port, logs / profile.value)


@dataclass
class _Round:
    """One row's figures of one round."""

    setup: list[float]
    rate: float
    per_link: float | None


def _one_round(section: Section, count: int, share: int, pair: Pair | None, direct_port: int) -> _Round:
    """``count`` links through a fresh ``pair`` (so memory starts clean), or straight to the sink."""
    if pair is None:
        setup, rate, _ = asyncio.run(_batch(direct_port, count, share, []))
        return _Round(setup, rate, None)
    for command in pair.commands:
        section.command(command)
    asyncio.run(_batch(pair.port, 1, 16 << 10, pair.pids))  # warm-up: first-use imports and buffers
    idle = sum(resident_kib(pid) for pid in pair.pids)
    setup, rate, resident = asyncio.run(_batch(pair.port, count, share, pair.pids))
    pair.stop()
    return _Round(setup, rate, (resident - idle) / count)


def _measure(section: Section, count: int, share: int, rounds: int,
             starters: dict[str, Callable[[], Pair | None]], direct_port: int) -> None:
    """Rounds of ``count`` links, every row in turn within a round; then one table row per starter."""
    results: dict[str, list[_Round]] = {label: [] for label in starters}
    for round_number in range(rounds):
        log(f"concurrency: N={count}, round {round_number + 1}/{rounds}")
        for label, start in starters.items():
            results[label].append(_one_round(section, count, share, start(), direct_port))
    stunnel = results.get(stunnel_label(count))
    for label, runs in results.items():
        all_up = [max(r.setup) for r in runs]
        figures = {"setup_p50_ms": median([percentile(r.setup, 0.5) for r in runs]) * 1e3,
                   "setup_p99_ms": median([percentile(r.setup, 0.99) for r in runs]) * 1e3,
                   "all_up_ms": median(all_up) * 1e3, "mb_s": median([r.rate for r in runs]) / 1e6}
        if stunnel is not None:
            figures["all_up_vs_stunnel"] = median([a / max(s.setup) for a, s in zip(all_up, stunnel, strict=True)])
        if runs[0].per_link is not None:
            figures["kib_per_link"] = median([r.per_link for r in runs if r.per_link is not None])
        section.add(label, **figures)
        kind = label.split(", ", 1)[1]
        for stat in ("p50", "p99"):
            series = section.series.setdefault(f"{kind} {stat}", {"x": [], "y": []})
            series["x"].append(float(count))
            series["y"].append(figures[f"setup_{stat}_ms"])
