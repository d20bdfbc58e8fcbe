"""The gateway's own targets in one run: DCMTK storescu -> storescp of one large study through the
`iscl tunnel` pair, beside plain TCP, DCMTK's own TLS and the engine's own DES-CBC + DES-MAC rate.

Run: python3 benchmarks/gateway.py [--profile v1.00|hardened|both] [--size BYTES] [--rounds N]

Targets, in each wire profile: tunnel none+md5 >= 0.5x plain TCP; tunnel DES-CBC+DES-MAC >= 0.9x the
engine's DES-CBC+DES-MAC rate in the same profile (1 MiB messages over the blocking transport, as
benchmarks/core.py measures it). V1.00's none+md5 is the SDK's plain, unkeyed MD5. Every transport runs
once per round, back to back, and each ratio is taken within its round (the machine is shared and noisy);
medians over the rounds are printed. Beside each rate, the CPU time every process of that transfer used
(storescu, storescp, the tunnels, or both ends of a link) per 100 MB: on two cores, a transfer that keeps
both busy cannot go faster than its CPU per byte allows, whatever the scheduling. `benchmarks/run.py`
has the wider DICOM comparison (every suite, pynetdicom, small objects); this script reuses its pieces.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    SPAWN,
    Children,
    CpuMeter,
    add_profile_option,
    make_token,
    median,
    profiles_of,
    suite_config,
    suite_label,
    use_token_in_child,
)
from benchmarks.dicom_store import StoreScp, Study, timed_store
from benchmarks.gateway_pair import GatewayPair
from benchmarks.links import iscl_rate, serve_iscl
from benchmarks.tls import Credentials, make_credentials
from iscl_hsm.dicom.study import StudySpec, write_study
from iscl_hsm.engine import Profile
from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder
from iscl_hsm.transport import aio
from iscl_hsm.transport.blocking import IsclSocket

MESSAGE = 1 << 20
TUNNEL_SUITES = ("none/md5", "des-cbc/des-mac")
ENGINE_SUITE = "des-cbc/des-mac"


def tunnel(profile: Profile, suite: str) -> str:
    return f"ISCL tunnel {suite_label(profile, suite)}"


def engine(profile: Profile) -> str:
    return f"engine {suite_label(profile, ENGINE_SUITE)} (blocking transport, as core.py)"


def transport(profile: Profile, suite: str) -> str:
    return f"asyncio transport {suite_label(profile, suite)}"


def ratios(profiles: tuple[Profile, ...]) -> dict[str, tuple[str, str, str]]:
    """Ratio name: (numerator row, denominator row, target), for each profile measured."""
    table: dict[str, tuple[str, str, str]] = {}
    for p in profiles:
        table[f"{p.value}: tunnel none/md5 ÷ plain TCP"] = (tunnel(p, "none/md5"), "plain TCP", ">= 0.5")
        table[f"{p.value}: tunnel {ENGINE_SUITE} ÷ engine {ENGINE_SUITE}"] = (
            tunnel(p, ENGINE_SUITE), engine(p), ">= 0.9")
        for suite in TUNNEL_SUITES:
            table[f"{p.value}: tunnel {suite} ÷ asyncio transport {suite}"] = (
                tunnel(p, suite), transport(p, suite), "-")
    table["DCMTK TLS ÷ plain TCP"] = ("DCMTK TLS", "plain TCP", "-")
    return table


def serve_aio(ports: Any, links: list[tuple[Profile, str]], data_dir: str, label: str, pin: str) -> None:
    """Server process: the asyncio transport (what the tunnels use) reading every message, one port per
    (profile, suite), put on the ``ports`` queue in the order of ``links``."""
    use_token_in_child(data_dir)
    holder = Pkcs11KeyHolder(label, pin)

    async def read_all(stream: aio.IsclStream) -> None:
        while await stream.recv() is not None:
            pass

    async def serve() -> None:
        for profile, suite in links:
            server = await aio.start_server(read_all, "127.0.0.1", 0, key_holder=holder,
                                            config=suite_config(profile, suite))
            ports.put(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(serve())


def aio_rate(port: int, profile: Profile, suite: str, holder: Pkcs11KeyHolder, payload: bytes, seconds: float
             ) -> float:
    """Bytes per second of 1 MiB messages over the asyncio transport until the server read the last one."""

    async def measure() -> float:
        config = suite_config(profile, suite)
        stream = await aio.open_connection("127.0.0.1", port, key_holder=holder, config=config)
        sent, started = 0, time.perf_counter()
        while not sent or time.perf_counter() - started < seconds:
            await stream.send(payload)
            sent += len(payload)
        await stream.close()
        return sent / (time.perf_counter() - started)

    return asyncio.run(measure())


def main() -> None:
    """Parse the options, measure in a temporary folder, print the tables; the folder goes at the end."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=200_000_000, help="study size in bytes (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are shown (default: %(default)s)")
    parser.add_argument("--engine-seconds", type=float, default=3.0,
                        help="seconds per engine and transport measurement per round (default: %(default)s)")
    add_profile_option(parser)
    args = parser.parse_args()
    profiles = profiles_of(args.profile)
    links = [(profile, suite) for profile in profiles for suite in TUNNEL_SUITES]

    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    workdir = Path(tempfile.mkdtemp(prefix="iscl-gateway-bench-", dir=shm))
    try:
        token = make_token(workdir / "softhsm")
        use_token_in_child(str(token.data_dir))
        credentials = make_credentials(workdir / "tls")
        spec = StudySpec.of_size(args.size)
        study = Study(f"{spec.images} x {spec.rows}x{spec.columns} CT", write_study(workdir / "study", spec))
        size = study.size
        logs = workdir / "logs"
        rates: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}  # CPU seconds per 100 MB
        with Children() as children:
            plain, secure = StoreScp(children, None, logs), StoreScp(children, credentials, logs)
            tunnels = {(p, suite): GatewayPair(children, token, p, suite, plain.port,
                                               logs / f"{p.value}-{suite.replace('/', '-')}")
                       for p, suite in links}
            listeners = {p: socket.create_server(("127.0.0.1", 0)) for p in profiles}
            engine_server = children.spawn(
                serve_iscl, [(listeners[p], suite_config(p, ENGINE_SUITE)) for p in profiles], str(token.data_dir),
                token.label, token.pin)
            queue = SPAWN.Queue()
            aio_server = children.spawn(serve_aio, queue, links, str(token.data_dir), token.label, token.pin)
            aio_ports = {link: queue.get(timeout=60) for link in links}
            holder = Pkcs11KeyHolder(token.label, token.pin)
            payload = os.urandom(MESSAGE)

            def engine_rate(profile: Profile) -> float:
                link = IsclSocket.connect("127.0.0.1", listeners[profile].getsockname()[1], key_holder=holder,
                                          config=suite_config(profile, ENGINE_SUITE))
                return iscl_rate(link, payload, args.engine_seconds)

            def store_rate(port: int, tls: Credentials | None = None) -> Callable[[], float]:
                return lambda: study.size / timed_store(port, study, tls)

            # name: (run, the long-lived processes it keeps busy besides this one and storescu)
            runs: dict[str, tuple[Callable[[], float], list[int]]] = {
                "plain TCP": (store_rate(plain.port), [plain.pid]),
                "DCMTK TLS": (store_rate(secure.port, credentials), [secure.pid]),
                **{tunnel(*link): (store_rate(pair.port), [plain.pid, *pair.pids])
                   for link, pair in tunnels.items()},
                **{engine(p): (functools.partial(engine_rate, p), [engine_server.pid]) for p in profiles},
                **{transport(*link): (functools.partial(
                    aio_rate, port, *link, holder, payload, args.engine_seconds), [aio_server.pid])
                   for link, port in aio_ports.items()},
            }
            for _ in range(args.rounds):
                for name, (run, pids) in runs.items():
                    with CpuMeter(pids) as meter:
                        rate = run()
                    rates.setdefault(name, []).append(rate)
                    cpu.setdefault(name, []).append(meter.seconds / (rate * meter.wall) * 1e8)
            holder.close()

    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"# iscl-hsm gateway benchmark ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores,"
          f" Python {sys.version.split()[0]})")
    print(f"command: python3 benchmarks/gateway.py {' '.join(sys.argv[1:])}")
    print(f"study: {study.name}, {size / 1e6:.1f} MB, one storescu association to storescp --ignore;"
          f" median of {args.rounds} rounds\n")
    print("| transfer | MB/s | CPU s per 100 MB, all its processes |\n|---|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {median(values) / 1e6:.1f} | {median(cpu[name]):.2f} |")
    print("\n| ratio (within each round) | median | target |\n|---|---|---|")
    for name, (top, bottom, target) in ratios(profiles).items():
        ratio = median([t / b for t, b in zip(rates[top], rates[bottom], strict=True)])
        print(f"| {name} | {ratio:.2f} | {target} |")


if __name__ == "__main__":
    main()
