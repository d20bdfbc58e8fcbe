#!/usr/bin/env python3
"""Compare DesKey's DES-CBC throughput with ``openssl speed -evp des-cbc`` measured in the same run.

``openssl speed`` divides by user CPU time (no ``-elapsed``), so DesKey is timed the same way for the
ratio; wall-clock rates are printed too. On a shared machine single runs swing by 10 %, hence several
interleaved rounds and medians. Rates are in MB/s of 10**6 bytes, as ``openssl speed`` counts "k".
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iscl_hsm.crypto.des import DesKey

LEGACY_CONF = """\
openssl_conf = openssl_init
[openssl_init]
providers = provider_sect
[provider_sect]
default = default_sect
legacy = legacy_sect
[default_sect]
activate = 1
[legacy_sect]
activate = 1
"""


def openssl_speed(conf: str, seconds: int, decrypt: bool) -> float:
    """Bytes per user CPU second that ``openssl speed -evp des-cbc`` reports for 8192-byte blocks."""
    command = ["openssl", "speed", "-mr", "-seconds", str(seconds), "-bytes", "8192"]
    command += ["-decrypt"] * decrypt + ["-evp", "des-cbc"]
    result = subprocess.run(
        command, env={**os.environ, "OPENSSL_CONF": conf}, capture_output=True, text=True, check=True
    )
    match = re.search(r"^\+F:\d+:DES-CBC:([\d.]+)", result.stdout, re.MULTILINE)
    if match is None:
        sys.exit(f"openssl speed printed no DES-CBC figure:\n{result.stdout}{result.stderr}")
    return float(match.group(1))


def user_time() -> float:
    """User CPU seconds of this process, the clock ``openssl speed`` uses by default."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def measure(operation: Callable[[], object], size: int, seconds: float) -> tuple[float, float]:
    """Run ``operation`` (one call processes ``size`` bytes) for ``seconds``; bytes/s by wall and user CPU."""
    operation()  # warm up: creates this thread's OpenSSL context
    calls = 0
    wall0, cpu0 = time.perf_counter(), user_time()
    while time.perf_counter() - wall0 < seconds:
        operation()
        calls += 1
    wall, cpu = time.perf_counter() - wall0, user_time() - cpu0
    return calls * size / wall, calls * size / cpu


def measure_threads(key: DesKey, size: int, seconds: float, threads: int) -> tuple[float, float]:
    """Total wall-clock bytes/s of ``threads`` threads sharing one key, and CPUs kept busy.

    More than one CPU busy shows the GIL is released while OpenSSL works.
    """
    data, iv = os.urandom(size), bytes(8)
    counts = [0] * threads
    start = threading.Barrier(threads + 1)

    def work(index: int) -> None:
        start.wait()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            key.encrypt_cbc(iv, data)
            counts[index] += 1

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - wall0
    return sum(counts) * size / wall, (time.process_time() - cpu0) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=2, help="length of each measurement")
    parser.add_argument(
        "--rounds", type=int, default=3, help="openssl-then-DesKey rounds; medians are reported"
    )
    args = parser.parse_args()
    mb = 1e6
    key = DesKey(os.urandom(8))
    ratios: dict[str, list[float]] = {}
    with tempfile.NamedTemporaryFile("w", suffix=".cnf") as conf:
        conf.write(LEGACY_CONF)
        conf.flush()
        for round_number in range(1, args.rounds + 1):
            print(f"round {round_number}")
            for direction in ("encrypt", "decrypt"):
                decrypt = direction == "decrypt"
                reference = openssl_speed(conf.name, args.seconds, decrypt)
                print(
                    f"  openssl speed -evp des-cbc{' -decrypt' * decrypt} 8192 B: {reference / mb:5.1f} MB/s"
                )
                method = key.decrypt_cbc if decrypt else key.encrypt_cbc
                for size in (8160, 1 << 20):
                    data, iv = os.urandom(size), bytes(8)
                    wall, cpu = measure(functools.partial(method, iv, data), size, args.seconds)
                    name = f"DesKey.{direction}_cbc {size:>7} B"
                    ratios.setdefault(name, []).append(cpu / reference)
                    print(
                        f"    {name}: {cpu / mb:5.1f} MB/s (ratio {cpu / reference:.2f});"
                        f" {wall / mb:5.1f} MB/s by wall clock"
                    )
    print(f"median ratio to openssl speed over {args.rounds} rounds (both per user CPU second):")
    for name, values in ratios.items():
        print(f"  {name}: {statistics.median(values):.2f}")
    single = measure(functools.partial(key.encrypt_cbc, bytes(8), os.urandom(8160)), 8160, args.seconds)[0]
    threads = 2
    rate, busy = measure_threads(key, 8160, args.seconds, threads)
    print(
        f"encrypt_cbc 8160 B by wall clock: 1 thread {single / mb:5.1f} MB/s,"
        f" {threads} threads sharing one DesKey {rate / mb:5.1f} MB/s in total"
        f" ({busy:.2f} of {os.cpu_count()} CPUs busy)"
    )


if __name__ == "__main__":
    main()
