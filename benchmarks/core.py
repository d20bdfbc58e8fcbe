"""Handshake latency and protected payload rate on SoftHSM2 over loopback, beside `openssl speed`.

Run: python3 benchmarks/core.py [--seconds S] [--handshakes N]

The server runs in its own process (as it would on another machine), so sender and receiver each
have a core. Ratios are what to compare: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iscl_hsm.allocator import keep_bulk_buffers  # noqa: E402
from iscl_hsm.engine import Config  # noqa: E402
from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder  # noqa: E402
from iscl_hsm.keyholder.provision import ensure_token, softhsm_environment  # noqa: E402
from iscl_hsm.transport.blocking import IsclSocket  # noqa: E402
from iscl_hsm.wire import Encryption, Mac  # noqa: E402

SUITES = [
    ("none/none", Encryption.NONE, Mac.NONE),
    ("none/md5", Encryption.NONE, Mac.MD5),
    ("none/des-mac", Encryption.NONE, Mac.DES_MAC),
    ("des-cbc/md5", Encryption.DES_CBC, Mac.MD5),
    ("des-cbc/des-mac", Encryption.DES_CBC, Mac.DES_MAC),
]
MESSAGE = 1 << 20


def openssl_speed(algorithm: str, seconds: int) -> float:
    """Bytes per second of `openssl speed -evp ALG` on 8192-byte buffers (legacy provider on)."""
    conf = Path(__file__).resolve().parents[1] / "softhsm" / "openssl-legacy.cnf"
    out = subprocess.run(
        ["openssl", "speed", "-elapsed", "-seconds", str(seconds), "-bytes", "8192", "-evp", algorithm],
        capture_output=True, text=True, env={**os.environ, "OPENSSL_CONF": str(conf)}, check=True,
    ).stdout
    match = re.search(rf"^{re.escape(algorithm.upper())}\s+([\d.]+)k", out, re.M | re.I)
    if not match:
        raise RuntimeError(f"cannot read openssl speed output:\n{out}")
    return float(match.group(1)) * 1000


def serve(listeners: list[tuple[socket.socket, int, int]], data_dir: str, label: str, pin: str,
          record_keys: str) -> None:
    """Server process: one listener per suite; accept links forever and read every message."""
    os.environ["SOFTHSM2_CONF"] = softhsm_environment(Path(data_dir))["SOFTHSM2_CONF"]
    keep_bulk_buffers()  # as `iscl` does
    holder = Pkcs11KeyHolder(label, pin, record_keys=record_keys)

    def accept_loop(listener: socket.socket, config: Config) -> None:
        while True:
            sock, _ = listener.accept()
            link = IsclSocket.accept(sock, key_holder=holder, config=config)
            while link.recv() is not None:
                pass

    for listener, enc, mac in listeners:
        config = Config(encryption=Encryption(enc), mac=Mac(mac))
        threading.Thread(target=accept_loop, args=(listener, config), daemon=True).start()
    threading.Event().wait()


def measure_rate(link: IsclSocket, payload: bytes, seconds: float) -> float:
    """Bytes per second of secured messages until the server has verified the last one."""
    sent = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        link.send(payload)
        sent += len(payload)
    link.close()  # returns once the server has answered the disconnection, after every message
    return sent / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="per throughput run")
    parser.add_argument("--rounds", type=int, default=5, help="runs per figure; the median is shown")
    parser.add_argument("--handshakes", type=int, default=300)
    parser.add_argument("--record-keys", choices=("host", "token"), default="host")
    args = parser.parse_args()
    keep_bulk_buffers()  # as `iscl` does

    data_dir = tempfile.mkdtemp(prefix="iscl-bench-")
    label, pin_path, _ = ensure_token(Path(data_dir), "bench")
    pin = pin_path.read_text().strip()
    holder = Pkcs11KeyHolder(label, pin, record_keys=args.record_keys)

    suites = {(enc, mac) for _, enc, mac in SUITES} | {(Encryption.DES_CBC, Mac.DES_MAC)}
    listeners = {suite: socket.create_server(("127.0.0.1", 0)) for suite in suites}
    ctx = multiprocessing.get_context("spawn")
    server = ctx.Process(
        target=serve,
        args=([(sock, int(enc), int(mac)) for (enc, mac), sock in listeners.items()], data_dir, label, pin,
              args.record_keys),
        daemon=True,
    )
    server.start()

    def link(enc: Encryption, mac: Mac) -> IsclSocket:
        port = listeners[(enc, mac)].getsockname()[1]
        return IsclSocket.connect("127.0.0.1", port, key_holder=holder, config=Config(encryption=enc, mac=mac))

    print(f"# iscl-hsm core benchmark ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores,"
          f" Python {sys.version.split()[0]}, record keys in {args.record_keys})")
    print(f"command: python3 benchmarks/core.py {' '.join(sys.argv[1:])}")
    times = []
    for _ in range(args.handshakes):
        started = time.perf_counter()
        s = link(Encryption.DES_CBC, Mac.DES_MAC)
        times.append(time.perf_counter() - started)
        s.close()
    times.sort()
    print(f"handshake, SoftHSM2 token, loopback: median {statistics.median(times) * 1000:.2f} ms,"
          f" p90 {times[int(len(times) * 0.9)] * 1000:.2f} ms ({len(times)} links)")

    payload = os.urandom(MESSAGE)
    print(f"\nprotected payload rate, 1 MiB messages, median of {args.rounds} rounds; each round runs"
          " `openssl speed -elapsed -evp des-cbc` just before, and the ratio is taken pair by pair")
    print("| suite | MB/s | openssl des-cbc MB/s | ratio |")
    print("|---|---|---|---|")
    for name, enc, mac in SUITES:
        rates, refs, ratios = [], [], []
        for _ in range(args.rounds):
            ref = openssl_speed("des-cbc", 1)
            rate = measure_rate(link(enc, mac), payload, args.seconds)
            rates.append(rate)
            refs.append(ref)
            ratios.append(rate / ref)
        print(f"| {name} | {statistics.median(rates) / 1e6:.1f} | {statistics.median(refs) / 1e6:.1f} |"
              f" {statistics.median(ratios):.2f} |")
    server.kill()


if __name__ == "__main__":
    main()
