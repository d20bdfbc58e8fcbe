"""Handshakes with keys on virtual IC cards: APDUs per side, median time, and a real-card estimate.

Run (as root: it starts a private pcscd): python3 benchmarks/card.py [--handshakes N]

Two virtual cards (`iscl card emulate` processes) sit in vsmartcard's two readers of a private
pcscd; a server process uses one, the client (this process) the other, over loopback TCP. The
estimate for a real card prices the handshake's longest chain of card commands: 10 ms for a simple
APDU (GET CHALLENGE) and 30..300 ms for one with a DES operation (INTERNAL / EXTERNAL AUTHENTICATE).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iscl_hsm.cardsim.daemon import READER_NAMES, SOCKET_ENV, PrivatePcscd
from iscl_hsm.cardsim.state import CardState
from iscl_hsm.crypto.des import fix_parity
from iscl_hsm.engine import Config
from iscl_hsm.keyholder.smartcard import SmartCardKeyHolder
from iscl_hsm.transport.blocking import IsclSocket
from iscl_hsm.wire import Encryption, Mac

PIN, SO_PIN = "1234", "87654321"
WARM_UP = 5
SIMPLE_MS = 10.0
DES_MS = (30.0, 300.0)
SUITES = {
    "des-cbc/des-mac": Config(encryption=Encryption.DES_CBC, mac=Mac.DES_MAC),
    "des-cbc/md5": Config(encryption=Encryption.DES_CBC, mac=Mac.MD5),
}


def make_card(path: Path) -> None:
    state = CardState.new(PIN, SO_PIN)
    state.set_key("auth", 1, fix_parity(bytes.fromhex("0123456789ABCDEF")))
    state.set_key("enc", 1, fix_parity(bytes.fromhex("FEDCBA9876543210")))
    state.create(path)


def serve(listener: socket.socket, config: Config, count: int, results: Any) -> None:
    """Server process (its own card, as on another machine): ``count`` links, then its APDUs per link."""
    with SmartCardKeyHolder(PIN, READER_NAMES[0], wait_card=20) as card:
        before = card.channel.commands_sent
        for _ in range(count):
            sock, _ = listener.accept()
            with IsclSocket.accept(sock, key_holder=card, config=config) as link:
                link.recv()
        results.put((card.channel.commands_sent - before) // count)


def handshakes(client_card: SmartCardKeyHolder, config: Config, count: int) -> tuple[list[float], int, int]:
    """``count`` handshakes (each then carries one byte, so record keys are derived too).

    Returns the client's times (connect to link up) and the APDUs per handshake of server and client.
    """
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        server = spawn.Process(target=serve, args=(listener, config, count, results))
        server.start()
        times = []
        before = client_card.channel.commands_sent
        for _ in range(count):  # the first WARM_UP wait for the server process to open its card
            start = time.perf_counter()
            link = IsclSocket.connect("127.0.0.1", listener.getsockname()[1], key_holder=client_card, config=config)
            times.append(time.perf_counter() - start)
            with link:
                link.send(b"x")
        server_apdus = results.get(timeout=60)
        server.join(60)
    return times[WARM_UP:], server_apdus, (client_card.channel.commands_sent - before) // count


def critical_path_ms(client_apdus: int, des_ms: float) -> float:
    """The handshake's longest chain of card operations, priced for a real card (docs/smart-cards.md).

    In turn: the server's GET CHALLENGE, the client's INTERNAL AUTHENTICATE and GET CHALLENGE, the
    server's EXTERNAL and INTERNAL AUTHENTICATE, the client's EXTERNAL AUTHENTICATE, then the record
    keys (both ends at once). Each end's handshake-MAC key is derived while the other end works.
    """
    handshake_des = 4
    record_keys = client_apdus - 4  # the client's other APDUs: INTERNAL AUTH, GET CHALLENGE, MAC key, EXTERNAL
    return 2 * SIMPLE_MS + (handshake_des + record_keys) * des_ms


@contextlib.contextmanager
def virtual_cards(directory: Path) -> Iterator[SmartCardKeyHolder]:
    """A private pcscd with two virtual cards (`iscl card emulate`); yields the client's (reader 1).

    The server side of :func:`handshakes` opens the card in reader 0. Everything is stopped on exit.
    """
    daemon = PrivatePcscd(directory)
    os.environ[SOCKET_ENV] = str(daemon.socket_link)
    daemon.start()
    emulators = []
    try:
        for slot in (0, 1):
            card_file = directory / f"card{slot}.json"
            make_card(card_file)
            emulators.append(subprocess.Popen(
                [sys.executable, "-m", "iscl_hsm", "card", "emulate", "--card-file", str(card_file),
                 "--port", str(daemon.reader_port(slot))], stderr=subprocess.DEVNULL,
            ))  # fmt: skip
        with SmartCardKeyHolder(PIN, READER_NAMES[1], wait_card=20) as client_card:
            yield client_card
    finally:
        for emulator in emulators:
            emulator.kill()
            emulator.wait()
        daemon.stop()


def median_ms(call: Callable[[], object], count: int = 500) -> float:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--handshakes", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory, virtual_cards(Path(directory)) as client_card:
        challenge = median_ms(lambda: client_card.get_challenge(1))
        internal = median_ms(lambda: client_card.internal_authenticate(1, bytes(8)))
        print(f"one APDU through pcscd and vpcd, median: GET CHALLENGE {challenge:.3f} ms,"
              f" INTERNAL AUTHENTICATE {internal:.3f} ms")
        for name, config in SUITES.items():
            times, server_apdus, client_apdus = handshakes(client_card, config, args.handshakes + WARM_UP)
            print(f"{name}: handshake median {statistics.median(times) * 1e3:.2f} ms"
                  f" (p90 {statistics.quantiles(times, n=10)[-1] * 1e3:.2f} ms) over {len(times)};"
                  f" APDUs per handshake: server {server_apdus}, client {client_apdus}"
                  " (1 GET CHALLENGE each, the rest INTERNAL/EXTERNAL AUTHENTICATE)")  # fmt: skip
            low, high = (critical_path_ms(client_apdus, des) for des in DES_MS)
            print(f"  real card: about {low:.0f}..{high:.0f} ms to the first protected message")


if __name__ == "__main__":
    main()
