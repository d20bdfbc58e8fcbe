"""`iscl card` and the link commands with a card, run as child processes against the private pcscd.

A card is made with `iscl card init`, inserted with `iscl card emulate` (the ``cards`` fixture),
provisioned with `iscl card load-key` from component files, and then used by `iscl client --reader`
against `iscl server --token` on a SoftHSM2 token holding the same keys. Links run in each wire
profile with a card link's options there (conftest.card_link_options: V1.00 with --enc-key-id
session); V1.00 with a card and a fixed encryption key is refused before the link starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from iscl_hsm.cardsim.daemon import PrivatePcscd
from iscl_hsm.cli.main import EXIT_CONFIG
from iscl_hsm.crypto.des import kcv
from iscl_hsm.engine import Profile

from ..conftest import HOSPITAL_KEYS, Hospitals
from ..test_cli import Server, child_env, iscl, one_line, start_server, token_args
from .conftest import CardRack, card_link_options, card_state, load_key, officer_env

READER_0 = "Virtual PCD 00 00"


def test_init_load_list_and_a_link_against_a_token(
    hospitals: Hospitals, servers: list[Server], cards: CardRack, pins: dict[str, Path], tmp_path: Path,
    profile: Profile,
) -> None:  # fmt: skip
    """The keys of pair 1 are all a link needs: under V1.00 its session keys come from encryption key 1."""
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
    options = card_link_options(profile)
    server = start_server(servers, [*token_args(hospitals, hospitals.a), *options], env, None,
                          tmp_path / "server.out")  # fmt: skip
    with open(tmp_path / "client.in", "rb") as stdin:
        client = iscl("client", "127.0.0.1", server.port, "--reader", "PCD 00 00", "--pin-file", pins["user"],
                      *options, env=env, stdin=stdin)  # fmt: skip
    assert client.returncode == 0, client.stderr
    assert server.finish() == 0, server.lines
    assert (tmp_path / "server.out").read_bytes() == message


def test_load_key_checks_the_so_pin_before_the_ceremony(
    cards: CardRack, pins: dict[str, Path], tmp_path: Path
) -> None:
    card = cards.insert(0, card_state(skip=(("auth", 4),)))
    code, out, err = load_key(tmp_path, pins, "auth", 4, HOSPITAL_KEYS["auth", 4], so_pin="wrong")
    assert code == EXIT_CONFIG
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
    assert code == EXIT_CONFIG
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
    profile: Profile,
) -> None:  # fmt: skip
    cards.insert(0, card_state(skip=(("auth", 2),)))
    env = child_env(hospitals)
    options = card_link_options(profile)
    server = start_server(servers, ["--reader", "PCD 00 00", "--pin-file", pins["user"], *options], env, None,
                          tmp_path / "server.out")  # fmt: skip
    client = iscl("client", "127.0.0.1", server.port, *token_args(hospitals, hospitals.b), "--auth-key-id", 2,
                  *options, env=env)  # fmt: skip
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


def card_to_card(servers: list[Server], tmp_path: Path, server_args: list[str], client_args: list[str]) -> str:
    """A link between `iscl server` on the card in reader 0 and `iscl client` on the card in reader 1
    (both inserted already), data both ways checked; the client's stderr."""
    reply, message = os.urandom(5000), os.urandom(20_000)
    (tmp_path / "server.in").write_bytes(reply)
    (tmp_path / "client.in").write_bytes(message)
    env = child_env()
    server = start_server(servers, ["--reader", "PCD 00 00", *server_args], env, tmp_path / "server.in",
                          tmp_path / "server.out")  # fmt: skip
    with open(tmp_path / "client.in", "rb") as stdin, open(tmp_path / "client.out", "wb") as stdout:
        client = iscl("client", "127.0.0.1", server.port, "--reader", "PCD 00 01", *client_args, env=env,
                      stdin=stdin, stdout=stdout)  # fmt: skip
    assert client.returncode == 0, client.stderr
    assert server.finish() == 0, server.lines
    assert (tmp_path / "server.out").read_bytes() == message
    assert (tmp_path / "client.out").read_bytes() == reply
    return client.stderr


def test_card_to_card_on_the_command_line(
    servers: list[Server], cards: CardRack, pins: dict[str, Path], tmp_path: Path, profile: Profile,
) -> None:  # fmt: skip
    cards.insert(0)
    cards.insert(1)
    options = ["--pin-file", str(pins["user"]), "--mac", "md5", *card_link_options(profile)]
    stderr = card_to_card(servers, tmp_path, options, options)
    keys = "session keys" if profile is Profile.V100 else "key 1"
    assert f"{profile.value} profile" in stderr
    assert f"des-cbc + md5 with {keys}" in stderr


FIXED_KEY_REFUSED = (
    "iscl: V1.00 links with encryption key 1 use that key itself as the DES key, and card in reader '{reader}'"
    " never gives a key out: use unique session keys (--enc-key-id session), which it derives for each message,"
    " or the hardened profile (--profile hardened) [ISCL 100 BAD_OPTION]"
)


def test_a_v100_card_link_with_a_fixed_encryption_key_is_refused_at_start(
    cards: CardRack, pins: dict[str, Path],
) -> None:  # fmt: skip
    """Server and client refuse before they listen or connect (nothing listens on port 9): one line."""
    cards.insert(0)
    for command in (["server", "--listen", "127.0.0.1:0"], ["client", "127.0.0.1", "9"]):
        for fixed in ([], ["--enc-key-id", "1"]):  # the default is key 1
            done = iscl(*command, "--reader", "PCD 00 00", "--pin-file", pins["user"], *fixed, env=child_env())
            assert done.returncode == 1, (command, done.stderr)
            assert one_line(done.stderr) == FIXED_KEY_REFUSED.format(reader=READER_0)
            assert done.stdout == ""


def test_the_same_card_link_works_in_the_hardened_profile_with_key_1(
    servers: list[Server], cards: CardRack, pins: dict[str, Path], tmp_path: Path,
) -> None:  # fmt: skip
    """The refused command line of the test above, with --profile hardened at both ends."""
    cards.insert(0)
    cards.insert(1)
    options = ["--pin-file", str(pins["user"]), "--enc-key-id", "1", "--profile", "hardened"]
    stderr = card_to_card(servers, tmp_path, options, options)
    assert "hardened profile" in stderr
    assert "des-cbc + des-mac with key 1" in stderr


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


def test_the_demo_runs_on_one_card(cards: CardRack, pins: dict[str, Path], tmp_path: Path, profile: Profile) -> None:
    """`iscl demo --card`: both ends on the card. V1.00 leaves out the five rows that would use encryption
    key 1 (a card never gives it out; none + none uses no key) and stores its study under session keys;
    hardened runs all twelve."""
    cards.insert(0)
    done = iscl("demo", "--card", "--pin-file", pins["user"], "--images", "2", "--profile", profile.value,
                env=child_env(XDG_DATA_HOME=str(tmp_path)))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and line.endswith("| ok |")]
    assert len(rows) == (7 if profile is Profile.V100 else 12), done.stdout
    assert ("left out" in done.stdout) is (profile is Profile.V100)
    assert "2 of 2 stored files equal the files sent" in done.stdout
