"""Fixtures for the IC-card tests: a real pcscd with the vsmartcard virtual reader, and virtual cards.

``pcsc`` (session) starts a private pcscd (iscl_hsm.cardsim.daemon: its own mount namespace, free
vpcd ports) and points PCSCLITE_CSOCK_NAME at it before this process first uses PC/SC. ``pcscd``
(per test) makes sure it runs, and starts it again after a test that stopped it. ``cards`` inserts
virtual cards (``iscl card emulate`` processes) into the two readers and pulls them after the test.
Both fail, never skip, when pcscd, vsmartcard-vpcd or pyscard are missing.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from iscl_hsm.cardsim.daemon import READER_NAMES, SOCKET_ENV, PrivatePcscd, missing_components
from iscl_hsm.cardsim.state import CardState

from ..conftest import HOSPITAL_KEYS
from ..test_cli import servers  # noqa: F401 - the `iscl server` fixture, for test_card_cli.py

USER_PIN = "246810"
SO_PIN = "13579135"
CARD_TIMEOUT = 30.0
"""Seconds to wait for pcscd to see a card come or go: a safety net, never an assertion."""


@pytest.fixture(scope="session")
def pcsc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivatePcscd]:
    missing = missing_components()
    if missing:
        pytest.fail(f"the smart-card tests need {', '.join(missing)}: apt-get install pcscd vsmartcard-vpcd")
    try:
        import smartcard.scard  # noqa: F401
    except ImportError:
        pytest.fail("pyscard is not installed: pip install -e '.[card]'")
    if os.geteuid() != 0:
        pytest.fail("the smart-card tests run a private pcscd in its own mount namespace, which needs root")
    daemon = PrivatePcscd(tmp_path_factory.mktemp("pcscd"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SOCKET_ENV, str(daemon.socket_link))
        daemon.start()
        try:
            yield daemon
        finally:
            daemon.stop()


@pytest.fixture
def pcscd(pcsc: PrivatePcscd) -> Iterator[PrivatePcscd]:
    """The private pcscd, running at the start of the test and again after it."""
    if not pcsc.running:
        pcsc.start()
    yield pcsc
    if not pcsc.running:
        pcsc.start()


@dataclass
class VirtualCard:
    """One ``iscl card emulate`` process in one reader."""

    reader: str
    file: Path
    process: subprocess.Popen[bytes]
    log: Path

    def pull(self) -> None:
        """Pull the card out: kill the emulator (SIGKILL, no goodbye) and wait until pcscd notices."""
        self.process.kill()
        self.process.wait(CARD_TIMEOUT)
        wait_for_card(self.reader, present=False)

    def state(self) -> CardState:
        return CardState.load(self.file)


def wait_for_card(reader: str, *, present: bool) -> None:
    from smartcard import scard

    result, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    assert result == scard.SCARD_S_SUCCESS, scard.SCardGetErrorMessage(result)
    try:
        deadline = time.monotonic() + CARD_TIMEOUT
        while time.monotonic() < deadline:
            result, states = scard.SCardGetStatusChange(context, 0, [(reader, scard.SCARD_STATE_UNAWARE)])
            if result == scard.SCARD_S_SUCCESS and bool(states[0][1] & scard.SCARD_STATE_PRESENT) == present:
                return
            time.sleep(0.02)
    finally:
        scard.SCardReleaseContext(context)
    pytest.fail(f"pcscd did not see the card {'arrive in' if present else 'leave'} reader '{reader}'")


def card_state(
    *, skip: tuple[tuple[str, int], ...] = (), replace: dict[tuple[str, int], bytes] | None = None,
    max_tries: int = 3,
) -> CardState:  # fmt: skip
    """A card holding HOSPITAL_KEYS (the hospitals' tokens hold them too), minus ``skip``, with ``replace``."""
    state = CardState.new(USER_PIN, SO_PIN, max_tries)
    keys = {**HOSPITAL_KEYS, **(replace or {})}
    for (purpose, index), value in keys.items():
        if (purpose, index) not in skip:
            state.set_key(purpose, index, value)
    return state


class CardRack:
    """Inserts virtual cards into the private pcscd's two readers; pulls them all at the end."""

    def __init__(self, daemon: PrivatePcscd, directory: Path) -> None:
        self.daemon = daemon
        self.directory = directory
        self.cards: list[VirtualCard] = []

    def insert(self, slot: int = 0, state: CardState | None = None) -> VirtualCard:
        file = self.directory / f"card-{len(self.cards)}.json"
        (state or card_state()).create(file)
        return self.insert_file(file, slot)

    def insert_file(self, file: Path, slot: int = 0) -> VirtualCard:
        log = file.with_suffix(".log")
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "iscl_hsm", "card", "emulate", "--card-file", str(file),
                 "--port", str(self.daemon.reader_port(slot))],
                stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
            )  # fmt: skip
        card = VirtualCard(READER_NAMES[slot], file, process, log)
        self.cards.append(card)
        wait_for_card(card.reader, present=True)
        return card

    def remove_all(self) -> None:
        for card in self.cards:
            if card.process.poll() is None:
                card.process.kill()
            card.process.wait(CARD_TIMEOUT)
        if self.daemon.running:
            for reader in READER_NAMES:
                wait_for_card(reader, present=False)


@pytest.fixture
def cards(pcscd: PrivatePcscd, tmp_path: Path) -> Iterator[CardRack]:
    rack = CardRack(pcscd, tmp_path)
    try:
        yield rack
    finally:
        rack.remove_all()


@pytest.fixture
def card_holders() -> Iterator[Callable[..., object]]:
    """``card_holders(card, pin=USER_PIN)`` opens a SmartCardKeyHolder, closed after the test."""
    from iscl_hsm.keyholder.smartcard import SmartCardKeyHolder

    with contextlib.ExitStack() as stack:

        def open_holder(card: VirtualCard, pin: str = USER_PIN) -> SmartCardKeyHolder:
            return stack.enter_context(SmartCardKeyHolder(pin, card.reader))

        yield open_holder
