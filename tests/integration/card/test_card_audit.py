"""`iscl card` ceremonies in the audit log of `iscl keys`, checked by `iscl keys audit verify`.

init, load-key, change-pin and unblock-pin each append one hash-chained entry (ok, failed: why, or
refused: why) naming the officer, the card and, for keys, the slot and KCV; never a PIN or a key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from iscl_hsm.cli.main import EXIT_CONFIG
from iscl_hsm.crypto.des import kcv

from ..conftest import HOSPITAL_KEYS
from ..test_cli import iscl, one_line
from .conftest import OFFICER, SO_PIN, USER_PIN, CardRack, audit_log_path, load_key, officer_env

READER_0 = "Virtual PCD 00 00"
CARD_0 = f"card in reader '{READER_0}'"


def entries(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in audit_log_path(tmp_path).read_text().splitlines()]


def summary(entry: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(entry[name] for name in ("action", "officer", "token", "purpose", "index", "kcv", "detail", "result"))


def test_a_card_ceremony_is_audited_and_the_chain_verifies(
    cards: CardRack, pins: dict[str, Path], tmp_path: Path
) -> None:
    env = officer_env(tmp_path)
    card_file = tmp_path / "card.json"
    init = iscl("card", "init", "--card-file", card_file, "--pin-file", pins["user"], "--so-pin-file", pins["so"],
                env=env)  # fmt: skip
    assert init.returncode == 0, init.stderr
    cards.insert_file(card_file, 0)
    assert load_key(tmp_path, pins, "auth", 1, HOSPITAL_KEYS["auth", 1])[0] == 0
    assert load_key(tmp_path, pins, "enc", 2, HOSPITAL_KEYS["enc", 2], so_pin="wrong")[0] == EXIT_CONFIG
    changed = iscl("card", "change-pin", "--reader", "00 00", "--pin-file", pins["user"], "--new-pin-file",
                   pins["new"], "--officer", "", env={**env, "ISCL_OFFICER": ""})  # the card holder, no officer
    assert changed.returncode == 0, changed.stderr
    unblocked = iscl("card", "unblock-pin", "--reader", "00 00", "--so-pin-file", pins["so"], "--new-pin-file",
                     pins["user"], "--officer", "Ken Ito", env=env)  # fmt: skip
    assert unblocked.returncode == 0, unblocked.stderr

    auth_kcv = kcv(HOSPITAL_KEYS["auth", 1]).hex().upper()
    log = entries(tmp_path)
    assert [summary(e) for e in log] == [
        ("card init", OFFICER, f"virtual card file {card_file}", None, None, None,
         "card-holder and security-officer PINs set, 3 tries each", "ok"),
        ("card load-key", OFFICER, CARD_0, "auth", 1, auth_kcv, "des", "ok"),
        ("card load-key", OFFICER, CARD_0, "enc", 2, None, None,
         (f"failed: wrong security-officer PIN for the {CARD_0}: 2 tries left before it blocks; check the PIN"
          " or PIN file")),
        ("card change-pin", None, CARD_0, None, None, None, "card-holder PIN", "ok"),
        ("card unblock-pin", "Ken Ito", CARD_0, None, None, None, "card-holder PIN set and unblocked", "ok"),
    ]  # fmt: skip
    text = audit_log_path(tmp_path).read_text()
    for secret in (USER_PIN, SO_PIN, "55443322", "999999", HOSPITAL_KEYS["auth", 1].hex()):
        assert secret.lower() not in text.lower()

    verified = iscl("keys", "audit", "verify", env=env)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.strip() == (
        f"audit log {audit_log_path(tmp_path)}: 5 entries, chain intact; head {log[-1]['hash']}"
    )


def test_a_card_ceremony_without_an_officer_is_refused_and_logged(pins: dict[str, Path], tmp_path: Path) -> None:
    card_file = tmp_path / "card.json"
    env = {**officer_env(tmp_path), "ISCL_OFFICER": ""}
    done = iscl("card", "init", "--card-file", card_file, "--pin-file", pins["user"], "--so-pin-file", pins["so"],
                env=env)  # fmt: skip
    assert done.returncode == 1
    refusal = (
        "'iscl card init' changes the card, so the audit log needs your name: pass --officer NAME or set"
        " ISCL_OFFICER"
    )
    assert one_line(done.stderr) == f"iscl: {refusal} [ISCL 100 BAD_OPTION]"
    assert not card_file.exists()
    [entry] = entries(tmp_path)
    assert summary(entry) == ("card init", None, f"virtual card file {card_file}", None, None, None, None,
                              f"refused: {refusal}")  # fmt: skip


def test_an_edited_card_entry_breaks_the_chain(pins: dict[str, Path], tmp_path: Path) -> None:
    env = officer_env(tmp_path)
    for name in ("a", "b"):
        done = iscl("card", "init", "--card-file", tmp_path / f"{name}.json", "--pin-file", pins["user"],
                    "--so-pin-file", pins["so"], "--audit-log", tmp_path / "ceremony.log", env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert not audit_log_path(tmp_path).exists()  # --audit-log was used instead of the default
    lines = (tmp_path / "ceremony.log").read_text().splitlines()
    lines[0] = lines[0].replace(OFFICER, "Someone Else")
    (tmp_path / "ceremony.log").write_text("\n".join(lines) + "\n")
    verified = iscl("keys", "audit", "verify", "--audit-log", tmp_path / "ceremony.log", env=env)
    assert verified.returncode == 1
    assert one_line(verified.stderr) == (
        f"iscl: line 1 of the audit log {tmp_path / 'ceremony.log'} (entry 1) was edited: its hash does not"
        " match its content [ISCL 130 AUDIT_LOG]"
    )
