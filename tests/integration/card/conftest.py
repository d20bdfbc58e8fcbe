"""Fixtures for the IC-card tests: a real pcscd with the vsmartcard virtual reader, and virtual cards.

``pcsc`` (session) starts a private pcscd (iscl_hsm.cardsim.daemon: its own mount namespace, free
vpcd ports) and points PCSCLITE_CSOCK_NAME at it before this process first uses PC/SC. ``pcscd``
(per test) makes sure it runs, and starts it again after a test that stopped it. ``cards`` inserts
virtual cards (``iscl card emulate`` processes) into the two readers and pulls them after the test;
``cards.insert_on_token`` inserts one whose keys stay in a SoftHSM2 token. Both fail, never skip,
when pcscd, vsmartcard-vpcd or pyscard are missing.

A card never gives a key out, and V1.00 uses encryption key N itself as the DES key of every
message, so a V1.00 link with a card uses unique session keys: :func:`card_key_id`,
:func:`card_config`, :func:`card_suites` and :func:`card_link_options` choose the settings a card
link has in each profile, so that a test of what both profiles share runs under both;
:func:`session_derivations` counts what such a link asks of the card.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from iscl_hsm import wire
from iscl_hsm.cardsim.daemon import READER_NAMES, SOCKET_ENV, PrivatePcscd, missing_components
from iscl_hsm.cardsim.state import CardState
from iscl_hsm.crypto.des import fix_parity
from iscl_hsm.engine import Config, Profile
from iscl_hsm.keys.components import format_hex
from iscl_hsm.wire import Encryption, Mac, Md5Order

from ..conftest import HOSPITAL_KEYS, Hospitals, SoftHsmToken
from ..gateway.conftest import gateway_loop, link_lines, start_tunnel, storescp  # noqa: F401 - for test_card_gateway.py
from ..test_cli import child_env, iscl, servers  # noqa: F401 - the `iscl server` fixture, for test_card_cli.py

USER_PIN = "246810"
SO_PIN = "13579135"
OFFICER = "Aiko Sato"
CARD_TIMEOUT = 30.0
"""Seconds to wait for pcscd to see a card come or go: a safety net, never an assertion."""

INSERT_ATTEMPTS = 3
"""Times a virtual card is inserted before pcscd's failure to see it fails the test."""


# --------------------------------------------------------------------------------------------------
# A card link's settings in each profile


def card_key_id(profile: Profile, encryption: Encryption, mac: Mac, enc_key_id: int = 1) -> int:
    """The encryption key id a link with a card uses in ``profile`` where others use ``enc_key_id``.

    V1.00 uses encryption key N itself as the DES key (and DES-MAC key) of every message, and a card
    never gives a key out, so wherever a V1.00 link needs a key at all it takes unique session keys,
    parity(E_EK[N](R)), one INTERNAL AUTHENTICATE per message. Hardened derives its record keys on the
    card from key N, so a card serves ``enc_key_id`` as it is.
    """
    if profile is Profile.V100 and (encryption, mac) != (Encryption.NONE, Mac.NONE):
        return wire.SESSION_KEYS
    return enc_key_id


def card_config(
    profile: Profile, encryption: Encryption = Encryption.DES_CBC, mac: Mac = Mac.DES_MAC, enc_key_id: int = 1,
    **settings: Any,
) -> Config:  # fmt: skip
    """The Config of a link with a card at one end or both: ``enc_key_id`` as :func:`card_key_id` says.

    V1.00 with encryption none and MD5 makes its MACs as MD5(message || E_K(R)), the order PS3.15
    keys with the message's session key, so that the card takes part (the SDK's other order would be
    a plain, unkeyed MD5, which a card has nothing to do with).
    """
    keyed_md5 = profile is Profile.V100 and (encryption, mac) == (Encryption.NONE, Mac.MD5)
    return Config(
        profile=profile, encryption=encryption, mac=mac, enc_key_id=card_key_id(profile, encryption, mac, enc_key_id),
        md5_order=Md5Order.ENCRYPT_RANDOM if keyed_md5 else Md5Order.ENCRYPT_OUTPUT, **settings,
    )  # fmt: skip


def card_suites(suites: Iterable[Any]) -> list[Any]:
    """``suites`` (pytest.param of encryption, mac, enc key id) in each profile, as pytest.param of
    (profile, encryption, mac, enc key id).

    The key id is the one a card link uses (:func:`card_key_id`), so under V1.00 a suite with key 1
    becomes its session-key twin; a suite met twice is run once.
    """
    params: dict[str, Any] = {}
    for profile in Profile:
        for suite in suites:
            encryption, mac = Encryption(suite.values[0]), Mac(suite.values[1])
            key = card_key_id(profile, encryption, mac, int(suite.values[2]))
            keys = "session" if key == wire.SESSION_KEYS else f"key{key}"
            name = f"{profile.value}-{encryption.name}-{mac.name}-{keys}"
            params.setdefault(name, pytest.param(profile, encryption, mac, key, id=name))
    return list(params.values())


def session_derivations(profile: Profile, mac: Mac) -> tuple[int, int]:
    """INTERNAL AUTHENTICATEs under an encryption key that one end's card makes with unique session keys
    (a keyed suite): (during the handshake, for each message it sends or receives).

    Hardened derives its handshake-MAC key during the handshake, and for each message a cipher key
    plus, with DES-MAC, a MAC key. V1.00 has no handshake MACs, and one key per message serves as its
    cipher key and its DES-MAC key.
    """
    if profile is Profile.V100:
        return 0, 1
    return 1, 2 if mac is Mac.DES_MAC else 1


def card_link_options(profile: Profile) -> list[str]:
    """The `iscl` link options that choose ``profile`` for a link with a card and a keyed suite."""
    options = ["--profile", profile.value]
    return [*options, "--enc-key-id", "session"] if profile is Profile.V100 else options


# --------------------------------------------------------------------------------------------------
# pcscd and the virtual cards


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


def officer_env(tmp_path: Path, hospitals: Hospitals | None = None) -> dict[str, str]:
    """A child's environment with an officer's name and a data directory (so the audit log) in ``tmp_path``."""
    return child_env(hospitals, ISCL_OFFICER=OFFICER, XDG_DATA_HOME=str(tmp_path / "data"))


def audit_log_path(tmp_path: Path) -> Path:
    """Where `iscl card` and `iscl keys` write the audit log under :func:`officer_env`."""
    return tmp_path / "data" / "iscl-hsm" / "audit.log"


def card_seen(reader: str, *, present: bool, timeout: float = CARD_TIMEOUT) -> bool:
    """Whether pcscd reports a card in (or no card in) ``reader`` within ``timeout`` seconds."""
    from smartcard import scard

    result, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    assert result == scard.SCARD_S_SUCCESS, scard.SCardGetErrorMessage(result)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result, states = scard.SCardGetStatusChange(context, 0, [(reader, scard.SCARD_STATE_UNAWARE)])
            if result == scard.SCARD_S_SUCCESS and bool(states[0][1] & scard.SCARD_STATE_PRESENT) == present:
                return True
            time.sleep(0.02)
    finally:
        scard.SCardReleaseContext(context)
    return False


def wait_for_card(reader: str, *, present: bool) -> None:
    if not card_seen(reader, present=present):
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

    def insert_on_token(self, hospitals: Hospitals, token: SoftHsmToken, slot: int = 0) -> VirtualCard:
        """A card whose file holds only its PINs and whose keys stay in ``token`` (the issue's --key-file name)."""
        file = self.directory / f"card-{len(self.cards)}.json"
        CardState.new(USER_PIN, SO_PIN).create(file)
        return self.insert_file(file, slot, "--token", token.label, "--pin-file", str(hospitals.pin_file(token)),
                                option="--key-file")  # fmt: skip

    def insert_file(self, file: Path, slot: int = 0, *extra: str, option: str = "--card-file") -> VirtualCard:
        """Start an emulator with ``file`` in reader ``slot``; return once pcscd sees the card.

        Now and then pcscd never reports a card although its emulator is connected to vpcd (seen
        once in CI on 2026-11-29, with no error in the emulator's log; vsmartcard issue #46
        describes the same in vpcd when cards reconnect): the card is then pulled and inserted
        again, up to :data:`INSERT_ATTEMPTS` times. The emulator's log keeps every attempt.
        """
        log = file.with_suffix(".log")
        reader = READER_NAMES[slot]
        for _ in range(INSERT_ATTEMPTS):
            with log.open("ab") as sink:
                process = subprocess.Popen(
                    [sys.executable, "-m", "iscl_hsm", "card", "emulate", option, str(file),
                     "--port", str(self.daemon.reader_port(slot)), *extra],
                    stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                )  # fmt: skip
            card = VirtualCard(reader, file, process, log)
            self.cards.append(card)
            if card_seen(reader, present=True, timeout=CARD_TIMEOUT / INSERT_ATTEMPTS):
                return card
            card.pull()
        pytest.fail(f"pcscd did not see the card arrive in reader '{reader}' in {INSERT_ATTEMPTS} insertions")

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


# --------------------------------------------------------------------------------------------------
# `iscl card` ceremonies from files


@pytest.fixture
def pins(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name, pin in (("user", USER_PIN), ("so", SO_PIN), ("wrong", "999999"), ("new", "55443322")):
        files[name] = tmp_path / f"{name}.pin"
        files[name].write_text(pin + "\n")
    return files


def component_files(tmp_path: Path, name: str, key: bytes) -> list[Path]:
    """Two component forms whose XOR (parity-adjusted) is ``key``."""
    first = fix_parity(os.urandom(len(key)))
    second = fix_parity(bytes(a ^ b for a, b in zip(key, first)))
    paths = []
    for number, component in enumerate((first, second), 1):
        path = tmp_path / f"{name}.{number}"
        path.write_text(f"# component {number}\n{format_hex(component)}\n")
        paths.append(path)
    return paths


def load_key(tmp_path: Path, pins: dict[str, Path], purpose: str, index: int, key: bytes,
             so_pin: str = "so") -> tuple[int, str, str]:  # fmt: skip
    """`iscl card load-key` into the card in reader 0, by the officer of :func:`officer_env`."""
    files = component_files(tmp_path, f"{purpose}-{index}", key)
    done = iscl(
        "card", "load-key", "--reader", "PCD 00 00", "--purpose", purpose, "--index", index, "--components", 2,
        "--component-file", files[0], "--component-file", files[1], "--so-pin-file", pins[so_pin], "--yes",
        env=officer_env(tmp_path),
    )  # fmt: skip
    return done.returncode, done.stdout, done.stderr
