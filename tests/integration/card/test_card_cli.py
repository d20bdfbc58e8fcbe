"""`iscl card` and the link commands with a card, run as child processes against the private pcscd.

A card is made with `iscl card init`, inserted with `iscl card emulate` (the ``cards`` fixture),
provisioned with `iscl card load-key` from component files, and then used by `iscl client --reader`
against `iscl server --token` on a SoftHSM2 token holding the same keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from iscl_hsm.cardsim.daemon import PrivatePcscd
from iscl_hsm.crypto.des import kcv

from ..conftest import HOSPITAL_KEYS, Hospitals
from ..test_cli import Server, child_env, iscl, one_line, start_server, token_args
from .conftest import CardRack, card_state, load_key, officer_env

READER_0 = "Virtual PCD 00 00"


def test_init_load_list_and_a_link_against_a_token(
    hospitals: Hospitals, servers: list[Server], cards: CardRack, pins: dict[str, Path], tmp_path: Path,
) -> None:  # fmt: skip
    card_file = tmp_path / "new-card.json"
    done = iscl("card", "init", "--card-file", card_file, "--pin-file", pins["user"], "--so-pin-file", pins["so"],
                env=officer_env(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(card_file.read_text())["keys"] == {}
    cards.insert_file(card_file, 0)

    for purpose in ("auth", "enc"):
        key = HOSPITAL_KEYS[purpose, 1]
        code, out, err = load_key(tmp_path, pins, purpose, 1, key)
        assert code == 0, err
        check = kcv(key).hex().upper()
        assert f"key KCV: {check}" in out
        assert out.rstrip().endswith(
            f"stored {purpose} key 1 (des) on the card in reader '{READER_0}', KCV {check} (confirmed by the card)"
        )
        assert key.hex().upper() not in out + err

    listed = iscl("card", "list", "--reader", "00 00", "--pin-file", pins["user"], env=child_env())
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [
        f"auth-1  KCV {kcv(HOSPITAL_KEYS['auth', 1]).hex().upper()}",
        f"enc-1  KCV {kcv(HOSPITAL_KEYS['enc', 1]).hex().upper()}",
    ]

    message = os.urandom(100_000)
    (tmp_path / "client.in").write_bytes(message)
    env = child_env(hospitals)
    server = start_server(servers, token_args(hospitals, hospitals.a), env, None, tmp_path / "server.out")
    with open(tmp_path / "client.in", "rb") as stdin:
        client = iscl("client", "127.0.0.1", server.port, "--reader", "PCD 00 00", "--pin-file", pins["user"],
                      env=env, stdin=stdin)  # fmt: skip
    assert client.returncode == 0, client.stderr
    assert server.finish() == 0, server.lines
    assert (tmp_path / "server.out").read_bytes() == message


def test_load_key_checks_the_so_pin_before_the_ceremony(
    cards: CardRack, pins: dict[str, Path], tmp_path: Path
) -> None:
    card = cards.insert(0, card_state(skip=(("auth", 4),)))
    code, out, err = load_key(tmp_path, pins, "auth", 4, HOSPITAL_KEYS["auth", 4], so_pin="wrong")
    assert code == 1
    assert one_line(err) == (
        f"iscl: wrong security-officer PIN for the card in reader '{READER_0}': 2 tries left before it blocks;"
        " check the PIN or PIN file [ISCL 102 LOCAL_KEY_HOLDER]"
    )
    assert "component" not in out  # no custodian was asked for anything
    assert card.state().key("auth", 4) is None


def test_load_key_with_the_user_pin_is_refused(cards: CardRack, pins: dict[str, Path], tmp_path: Path) -> None:
    """PUT KEY needs the security officer: the card-holder PIN (a valid PIN, wrong role) does not do."""
    cards.insert(0, card_state())
    code, _, err = load_key(tmp_path, pins, "auth", 4, HOSPITAL_KEYS["auth", 4], so_pin="user")
    assert code == 1
    assert "wrong security-officer PIN" in one_line(err)


def test_change_pin_then_unblock(cards: CardRack, pins: dict[str, Path], tmp_path: Path) -> None:
    card = cards.insert(0, card_state())
    env = officer_env(tmp_path)
    changed = iscl("card", "change-pin", "--reader", "00 00", "--pin-file", pins["user"], "--new-pin-file",
                   pins["new"], env=env)  # fmt: skip
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout.strip() == f"the card-holder PIN of the card in reader '{READER_0}' was changed"

    old = iscl("card", "list", "--reader", "00 00", "--pin-file", pins["user"], env=env)
    assert one_line(old.stderr) == (
        f"iscl: wrong card-holder PIN for the card in reader '{READER_0}': 2 tries left before it blocks;"
        " check the PIN or PIN file [ISCL 102 LOCAL_KEY_HOLDER]"
    )
    for _ in range(2):
        iscl("card", "list", "--reader", "00 00", "--pin-file", pins["wrong"], env=env)
    blocked = iscl("card", "list", "--reader", "00 00", "--pin-file", pins["new"], env=env)
    assert "is blocked (6983)" in one_line(blocked.stderr) and "iscl card unblock-pin" in blocked.stderr
    assert card.state().pins["user"].tries_left == 0

    unblocked = iscl("card", "unblock-pin", "--reader", "00 00", "--so-pin-file", pins["so"], "--new-pin-file",
                     pins["user"], env=env)  # fmt: skip
    assert unblocked.returncode == 0, unblocked.stderr
    assert iscl("card", "list", "--reader", "00 00", "--pin-file", pins["user"], env=env).returncode == 0


def test_a_card_server_missing_a_key_naks_a_real_client(
    hospitals: Hospitals, servers: list[Server], cards: CardRack, pins: dict[str, Path], tmp_path: Path,
) -> None:  # fmt: skip
    cards.insert(0, card_state(skip=(("auth", 2),)))
    env = child_env(hospitals)
    server = start_server(servers, ["--reader", "PCD 00 00", "--pin-file", pins["user"]], env, None,
                          tmp_path / "server.out")  # fmt: skip
    client = iscl("client", "127.0.0.1", server.port, *token_args(hospitals, hospitals.b), "--auth-key-id", 2,
                  env=env)  # fmt: skip
    assert client.returncode == 1
    assert one_line(client.stderr) == (
        "iscl: the server's key holder failed (see the server's log) [ISCL 103 REMOTE_KEY_HOLDER]"
    )
    failure = server.wait_for("failed during the handshake").string.rstrip("\n")
    assert failure.endswith(
        f"key not found: the card in reader '{READER_0}' holds no auth key 2 (6A88); load it with"
        " 'iscl card load-key' [ISCL 125 KEY_NOT_FOUND]"
    )


def test_pcscd_not_running_is_one_line(hospitals: Hospitals, pins: dict[str, Path], tmp_path: Path) -> None:
    env = child_env(hospitals, PCSCLITE_CSOCK_NAME=str(tmp_path / "no-pcscd.comm"))
    client = iscl("client", "127.0.0.1", 9, "--card", "--pin-file", pins["user"], env=env)
    assert one_line(client.stderr) == (
        "iscl: the PC/SC service pcscd is not running: start it (mkdir -p /run/pcscd; pcscd -f, or systemctl"
        " start pcscd.socket) and try again [ISCL 102 LOCAL_KEY_HOLDER]"
    )


def test_record_keys_in_a_card_are_refused(pins: dict[str, Path]) -> None:
    client = iscl("client", "127.0.0.1", 9, "--card", "--record-keys", "token", env=child_env())
    assert one_line(client.stderr) == (
        "iscl: record keys derived by an IC card always live on the host: drop --record-keys token"
        " [ISCL 100 BAD_OPTION]"
    )


def test_the_emulator_says_what_it_is_for() -> None:
    shown = iscl("card", "emulate", "--help", env=child_env())
    assert "for tests, demos and practising ceremonies, never for patient data" in " ".join(shown.stdout.split())


def test_card_to_card_on_the_command_line(
    servers: list[Server], cards: CardRack, pins: dict[str, Path], tmp_path: Path
) -> None:
    cards.insert(0)
    cards.insert(1)
    reply, message = os.urandom(5000), os.urandom(20_000)
    (tmp_path / "server.in").write_bytes(reply)
    (tmp_path / "client.in").write_bytes(message)
    env = child_env()
    server = start_server(servers, ["--reader", "PCD 00 00", "--pin-file", pins["user"], "--mac", "md5"], env,
                          tmp_path / "server.in", tmp_path / "server.out")  # fmt: skip
    with open(tmp_path / "client.in", "rb") as stdin, open(tmp_path / "client.out", "wb") as stdout:
        client = iscl("client", "127.0.0.1", server.port, "--reader", "PCD 00 01", "--pin-file", pins["user"],
                      "--mac", "md5", env=env, stdin=stdin, stdout=stdout)  # fmt: skip
    assert client.returncode == 0, client.stderr
    assert server.finish() == 0, server.lines
    assert (tmp_path / "server.out").read_bytes() == message
    assert (tmp_path / "client.out").read_bytes() == reply
    assert "des-cbc + md5 with key 1" in client.stderr


def test_the_emulator_ends_when_pcscd_stops(cards: CardRack, pcscd: PrivatePcscd) -> None:
    card = cards.insert(0)
    pcscd.stop()
    assert card.process.wait(60) == 0
    assert card.log.read_text().splitlines()[-1] == (
        "iscl card: the reader closed the connection (pcscd stopped); the card is out"
    )


def test_no_reader_is_one_line(pcsc: PrivatePcscd, pins: dict[str, Path], tmp_path: Path) -> None:
    empty = PrivatePcscd(tmp_path / "pcscd", virtual_reader=False)
    empty.start()
    try:
        env = child_env(PCSCLITE_CSOCK_NAME=str(empty.socket_link))
        client = iscl("client", "127.0.0.1", 9, "--card", "--pin-file", pins["user"], env=env)
    finally:
        empty.stop()
    assert one_line(client.stderr) == (
        "iscl: no smart-card reader is connected (pcscd lists none): plug one in, or for the virtual card"
        " install vsmartcard-vpcd and restart pcscd [ISCL 102 LOCAL_KEY_HOLDER]"
    )
