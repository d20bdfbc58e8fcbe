"""Handshakes with keys on virtual IC cards: APDUs per side, median time, and a real-card estimate.

Run (as root: it starts a private pcscd):
    python3 benchmarks/card.py [--handshakes N] [--profile v1.00|hardened|both]

Two virtual cards (`iscl card emulate` processes) sit in vsmartcard's two readers of a private
pcscd; a server process uses one, the client (this process) the other, over loopback TCP. Each link
is a handshake and one 1-byte message from the client. A card never gives a key out, so V1.00
(which uses encryption key N itself as the DES key) runs with unique session keys; hardened with
encryption key 1. The estimate for a real card prices the longest chain of card commands: 10 ms for
a simple APDU (GET CHALLENGE) and 30..300 ms for one with a DES operation (INTERNAL / EXTERNAL
AUTHENTICATE).
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
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_profile_option, profiles_of, suite_config
from iscl_hsm import wire
from iscl_hsm.cardsim.daemon import READER_NAMES, SOCKET_ENV, PrivatePcscd
from iscl_hsm.cardsim.state import CardState
from iscl_hsm.crypto.des import fix_parity
from iscl_hsm.engine import Config, Profile
from iscl_hsm.keyholder.smartcard import SmartCardKeyHolder
from iscl_hsm.transport.blocking import IsclSocket

PIN, SO_PIN = "1234", "87654321"
WARM_UP = 5
SIMPLE_MS = 10.0
DES_MS = (30.0, 300.0)
SUITES = ("des-cbc/des-mac", "des-cbc/md5")
SERVER_UNTIL_PASS_3 = 4
"""The hardened server's APDUs up to pass 3: GET CHALLENGE, the handshake-MAC key (while the client
works), EXTERNAL and INTERNAL AUTHENTICATE; its record keys follow."""


class Apdus(NamedTuple):
    """APDUs one end's card gets per link."""

    handshake: int
    """From connect (or accept) until this end's link is up."""
    message: int
    """For the link's one 1-byte message, client to server."""


def link_config(profile: Profile, suite: str) -> Config:
    """``suite`` over cards in ``profile``: V1.00 with unique session keys, since it uses encryption
    key N itself as the DES key and a card never gives it out; hardened with encryption key 1."""
    return suite_config(profile, suite, enc_key_id=wire.SESSION_KEYS if profile is Profile.V100 else 1)


def keys_label(config: Config) -> str:
    return "session keys" if config.enc_key_id == wire.SESSION_KEYS else f"encryption key {config.enc_key_id}"


def make_card(path: Path) -> None:
    state = CardState.new(PIN, SO_PIN)
    state.set_key("auth", 1, fix_parity(bytes.fromhex("0123456789ABCDEF")))
    state.set_key("enc", 1, fix_parity(bytes.fromhex("FEDCBA9876543210")))
    state.create(path)


class ApduCounter:
    """Counts one card's APDUs over links, split into handshake and message (:class:`Apdus`)."""

    def __init__(self, card: SmartCardKeyHolder) -> None:
        self.card = card
        self.links = self.handshake = self.message = 0
        self._mark = card.channel.commands_sent

    def _since_mark(self) -> int:
        sent, self._mark = self.card.channel.commands_sent - self._mark, self.card.channel.commands_sent
        return sent

    def start(self) -> None:
        self._since_mark()

    def link_up(self) -> None:
        self.handshake += self._since_mark()
        self.links += 1

    def message_done(self) -> None:
        self.message += self._since_mark()

    def per_link(self) -> Apdus:
        return Apdus(self.handshake // self.links, self.message // self.links)


def serve(listener: socket.socket, config: Config, count: int, results: Any) -> None:
    """Server process (its own card, as on another machine): ``count`` links, then its Apdus per link."""
    with SmartCardKeyHolder(PIN, READER_NAMES[0], wait_card=20) as card:
        counter = ApduCounter(card)
        for _ in range(count):
            sock, _ = listener.accept()
            counter.start()
            with IsclSocket.accept(sock, key_holder=card, config=config) as link:
                counter.link_up()
                link.recv()
                counter.message_done()
        results.put(tuple(counter.per_link()))


def handshakes(client_card: SmartCardKeyHolder, config: Config, count: int) -> tuple[list[float], Apdus, Apdus]:
    """``count`` links, each a handshake and one 1-byte message from the client.

    Returns the client's times (connect to link up) and the Apdus per link of server and client.
    """
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    counter = ApduCounter(client_card)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        server = spawn.Process(target=serve, args=(listener, config, count, results))
        server.start()
        times = []
        for _ in range(count):  # the first WARM_UP wait for the server process to open its card
            counter.start()
            start = time.perf_counter()
            link = IsclSocket.connect("127.0.0.1", listener.getsockname()[1], key_holder=client_card, config=config)
            times.append(time.perf_counter() - start)
            counter.link_up()
            with link:
                link.send(b"x")
            counter.message_done()
        server_apdus = Apdus(*results.get(timeout=60))
        server.join(60)
    return times[WARM_UP:], server_apdus, counter.per_link()


class Estimate(NamedTuple):
    """Milliseconds until points of a link with real cards (docs/smart-cards.md, "Speed")."""

    link_up: float
    first_message: float
    each_further_message: float


def estimate_ms(profile: Profile, server: Apdus, client: Apdus, des_ms: float) -> Estimate:
    """The longest chain of card operations, priced for a real card whose DES operations take ``des_ms``.

    A card does one command at a time, and an end does its key-holder work ahead (prepare()) before
    it reads the peer's next pass. Both profiles: the server's GET CHALLENGE; the client's INTERNAL
    AUTHENTICATE and GET CHALLENGE (pass 2); the server's EXTERNAL and INTERNAL AUTHENTICATE (pass 3).
    The client's EXTERNAL AUTHENTICATE of pass 3 brings its link up, once its card has also done what
    else the handshake asks of it (hardened: the handshake-MAC key and the record keys; V1.00:
    nothing). Hardened's server derives its record keys after pass 3, while the client works, and
    later messages need no card. V1.00 derives a session key for each message: its sender's INTERNAL
    AUTHENTICATE, then its receiver's.
    """
    pass_3 = 2 * SIMPLE_MS + 3 * des_ms
    client_ready = 2 * SIMPLE_MS + (client.handshake - 2) * des_ms  # all but its GET CHALLENGE and the check
    link_up = max(pass_3, client_ready) + des_ms
    if profile is Profile.V100:
        per_message = (client.message + server.message) * des_ms
        return Estimate(link_up, link_up + per_message, per_message)
    server_keys = pass_3 + (server.handshake - SERVER_UNTIL_PASS_3) * des_ms
    return Estimate(link_up, max(link_up, server_keys), 0.0)


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
    add_profile_option(parser)
    args = parser.parse_args()
    if args.handshakes < 2:
        parser.error("--handshakes must be at least 2 (a median and a p90 need two)")
    with tempfile.TemporaryDirectory() as directory, virtual_cards(Path(directory)) as client_card:
        challenge = median_ms(lambda: client_card.get_challenge(1))
        internal = median_ms(lambda: client_card.internal_authenticate(1, bytes(8)))
        print(f"one APDU through pcscd and vpcd, median: GET CHALLENGE {challenge:.3f} ms,"
              f" INTERNAL AUTHENTICATE {internal:.3f} ms")
        for profile in profiles_of(args.profile):
            for suite in SUITES:
                config = link_config(profile, suite)
                times, server, client = handshakes(client_card, config, args.handshakes + WARM_UP)
                print(f"{profile.value} {suite} ({keys_label(config)}): handshake median"
                      f" {statistics.median(times) * 1e3:.2f} ms (p90 {statistics.quantiles(times, n=10)[-1] * 1e3:.2f}"
                      f" ms) over {len(times)}; APDUs per handshake: server {server.handshake}, client"
                      f" {client.handshake} (1 GET CHALLENGE each, the rest INTERNAL/EXTERNAL AUTHENTICATE);"
                      f" for the 1-byte message: server {server.message}, client {client.message}")  # fmt: skip
                print("  real card: " + describe_estimates([estimate_ms(profile, server, client, des) for des in DES_MS]))


def describe_estimates(estimates: list[Estimate]) -> str:
    """One line of the (low, high) estimates."""
    def span(field: str) -> str:
        low, high = (getattr(estimate, field) for estimate in estimates)
        return f"{low:.0f}..{high:.0f} ms"

    line = f"about {span('link_up')} to link up, {span('first_message')} to the first protected message"
    if estimates[0].each_further_message:
        line += f", then {span('each_further_message')} for each further message"
    return line


if __name__ == "__main__":
    main()
