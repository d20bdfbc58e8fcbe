"""Handshake latency and protected payload rate on SoftHSM2 over loopback, beside `openssl speed`.

Run: python3 benchmarks/core.py [--profile v1.00|hardened|both] [--seconds S] [--handshakes N]
        [--record-keys host|token]

The server runs in its own process (as it would on another machine), so sender and receiver each
have a core. Ratios are what to compare: this machine is shared and noisy. Each suite's row also shows
the CPU each end used per MiB, and the last line one end's floor at OpenSSL's DES and MD5 speeds: what
a change to the record path saves shows there first. `python3 benchmarks/run.py` puts these figures
next to TLS, plain TCP, DICOM and the gateway.

Both ends use the token this script makes, whose encryption keys are host-readable. With
``--record-keys token`` every record key stays in SoftHSM2 and DES runs there: in the hardened profile
the keys derived per link, in V1.00 encryption key 1 itself.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    SUITES,
    Children,
    CpuMeter,
    add_profile_option,
    make_token,
    openssl_speed,
    profiles_of,
    suite_config,
    suite_label,
)
from benchmarks.links import iscl_rate, serve_iscl
from iscl_hsm.allocator import keep_bulk_buffers
from iscl_hsm.engine import Config, Profile
from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder
from iscl_hsm.transport.blocking import IsclSocket

MESSAGE = 1 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="per throughput run")
    parser.add_argument("--rounds", type=int, default=5, help="runs per figure; the median is shown")
    parser.add_argument("--handshakes", type=int, default=300)
    parser.add_argument("--record-keys", choices=("host", "token"), default="host",
                        help="host: DES in OpenSSL (default); token: record keys stay in SoftHSM2, DES runs there")
    add_profile_option(parser)
    args = parser.parse_args()
    keep_bulk_buffers()  # as `iscl` does

    profiles = profiles_of(args.profile)
    configs: dict[tuple[Profile, str], Config] = {(p, suite): suite_config(p, suite) for p in profiles
                                                  for suite in SUITES}
    listeners = {key: socket.create_server(("127.0.0.1", 0)) for key in configs}
    with tempfile.TemporaryDirectory(prefix="iscl-bench-") as directory, Children() as children:
        token = make_token(Path(directory))
        holder = Pkcs11KeyHolder(token.label, token.pin, record_keys=args.record_keys)
        server = children.spawn(serve_iscl, [(listeners[name], config) for name, config in configs.items()],
                       str(token.data_dir), token.label, token.pin, args.record_keys)

        def link(key: tuple[Profile, str]) -> IsclSocket:
            port = listeners[key].getsockname()[1]
            return IsclSocket.connect("127.0.0.1", port, key_holder=holder, config=configs[key])

        print(f"# iscl-hsm core benchmark ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores,"
              f" Python {sys.version.split()[0]}, record keys in {args.record_keys})")
        print(f"command: python3 benchmarks/core.py {' '.join(sys.argv[1:])}")
        for profile in profiles:
            times = []
            for _ in range(args.handshakes):
                started = time.perf_counter()
                s = link((profile, "des-cbc/des-mac"))
                times.append(time.perf_counter() - started)
                s.close()
            times.sort()
            print(f"handshake, {profile.value}, SoftHSM2 token, loopback:"
                  f" median {statistics.median(times) * 1000:.2f} ms, p90 {times[int(len(times) * 0.9)] * 1000:.2f} ms ({len(times)} links)")

        payload = os.urandom(MESSAGE)
        print(f"\nprotected payload rate, 1 MiB messages, median of {args.rounds} rounds; each round runs"
              " `openssl speed -elapsed -evp des-cbc` just before, and the ratio is taken pair by pair. CPU is"
              " what each end used per MiB (sender: this process; receiver: the server process)")
        print("| profile and suite | MB/s | openssl des-cbc MB/s | ratio | sender CPU ms/MiB"
              " | receiver CPU ms/MiB |")
        print("|---|---|---|---|---|---|")
        for key in configs:
            rates, refs, ratios, sender, receiver = [], [], [], [], []
            for _ in range(args.rounds):
                ref = openssl_speed("des-cbc", 1)
                with CpuMeter([]) as own, CpuMeter([server.pid]) as both:
                    rate = iscl_rate(link(key), payload, args.seconds)
                mib = rate * both.wall / MESSAGE
                rates.append(rate)
                refs.append(ref)
                ratios.append(rate / ref)
                sender.append(own.seconds / mib * 1000)
                receiver.append((both.seconds - own.seconds) / mib * 1000)
            print(f"| {suite_label(*key)} | {statistics.median(rates) / 1e6:.1f} |"
                  f" {statistics.median(refs) / 1e6:.1f} |"
                  f" {statistics.median(ratios):.2f} | {statistics.median(sender):.2f} |"
                  f" {statistics.median(receiver):.2f} |")
        des, md5 = openssl_speed("des-cbc", 1), openssl_speed("md5", 1)
        print(f"\none end's floor at OpenSSL's speeds: DES {MESSAGE / des * 1000:.2f} ms/MiB,"
              f" MD5 {MESSAGE / md5 * 1000:.2f} ms/MiB")


if __name__ == "__main__":
    main()
