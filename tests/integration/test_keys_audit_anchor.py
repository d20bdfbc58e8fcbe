"""The audit log anchored in the token: `iscl keys audit verify --token` catches what a bare chain cannot.

Real SoftHSM2 tokens from the pool; ``iscl keys`` runs as subprocesses, as an officer runs it. Each
test writes its own log, so each log has its own anchor in the token (anchors are per log path).
"""

from __future__ import annotations

import getpass
import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pkcs11 import Attribute, ObjectClass
from pkcs11 import exceptions as p11

from iscl_hsm.cli.status import EXIT_FAILURE, EXIT_UNAVAILABLE, EXIT_USAGE
from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder
from iscl_hsm.keys.anchor import MAC_KEY_LABEL, TokenAnchor
from iscl_hsm.keys.audit import AuditLog, entry_hash
from iscl_hsm.keys.store import KeyStore

from .conftest import SoftHsm, SoftHsmToken, pkcs11_tool

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Desk:
    """A security officer's desk: a token, its PIN file, and ``iscl keys`` run against it."""

    token: SoftHsmToken
    pin_file: Path
    env: dict[str, str]

    def keys(
        self, *args: str, log: Path, pin_file: Path | None = None, token: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "iscl_hsm", "keys", *args, "--audit-log", str(log)]
        command += ["--token", token or self.token.label, "--pin-file", str(pin_file or self.pin_file)]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=120, check=False)

    def chain_only(self, log: Path, *args: str) -> subprocess.CompletedProcess[str]:
        """``audit verify`` without a token: the hash chain alone."""
        command = [
            sys.executable,
            "-m",
            "iscl_hsm",
            "keys",
            "audit",
            "verify",
            "--audit-log",
            str(log),
            *args,
        ]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60, check=False)

    def ok(self, *args: str, log: Path) -> str:
        done = self.keys(*args, log=log)
        assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def verify_fails(self, log: Path, match: str, status: int = EXIT_FAILURE, **kwargs: Any) -> str:
        """``audit verify --token`` fails with exit ``status`` and one sentence matching ``match``."""
        done = self.keys("audit", "verify", log=log, **kwargs)
        assert done.returncode == status, f"verify did not fail:\n{done.stdout}\n{done.stderr}"
        assert "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("iscl: "), done.stderr
        assert re.search(match, lines[0]), lines[0]
        return lines[0]


def _desk(softhsm: SoftHsm, folder: Path, name: str) -> Desk:
    token = softhsm.take()
    pin_file = folder / f"{name}.pin"
    pin_file.write_text(token.pin + "\n")
    pin_file.chmod(0o600)
    env = {**softhsm.tool_env(), "PYTHONPATH": str(REPO), "ISCL_OFFICER": "Anchor Test"}
    env.pop("ISCL_PIN", None)
    return Desk(token, pin_file, env)


@pytest.fixture(scope="module")
def desks(softhsm: SoftHsm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Desk, Desk]]:
    """Two sites' tokens, each with auth key 1 already generated (logged elsewhere)."""
    folder = tmp_path_factory.mktemp("anchor")
    made = (_desk(softhsm, folder, "a"), _desk(softhsm, folder, "b"))
    for desk in made:
        desk.ok("generate", "--purpose", "auth", "--index", "1", log=folder / "setup.log")
    yield made


def _entries(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _write(log: Path, entries: list[dict[str, Any]]) -> None:
    log.write_text("".join(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n" for e in entries))


def _anchored_log(desk: Desk, log: Path, commands: int = 4) -> list[dict[str, Any]]:
    for _ in range(commands):
        desk.ok("list", log=log)
    entries = _entries(log)
    assert all(e["mac"] for e in entries)
    return entries


def test_an_untampered_log_verifies_against_its_token(desks: tuple[Desk, Desk], tmp_path: Path) -> None:
    a, _ = desks
    log = tmp_path / "audit.log"
    bad_pin = tmp_path / "bad.pin"
    bad_pin.write_text("not-the-pin\n")
    a.ok("generate", "--purpose", "enc", "--index", "2", log=log)
    a.ok("list", log=log)
    assert a.keys("generate", "--purpose", "enc", "--index", "2", log=log).returncode == EXIT_USAGE  # in use
    a.ok("rotate", "--purpose", "enc", "--index", "2", "--grace", "1d", log=log)
    # A wrong PIN never logs in, so its entry is not anchored.
    assert a.keys("list", log=log, pin_file=bad_pin).returncode == EXIT_UNAVAILABLE
    a.ok("check", "--purpose", "enc", "--index", "2", "--kcv", _entries(log)[3]["kcv"], log=log)
    a.ok("policy", "show", log=log)
    a.ok("witness", "list", log=log)
    entries = _entries(log)
    assert [(e["action"], e["result"][:6], bool(e.get("mac"))) for e in entries] == [
        ("generate", "ok", True),
        ("list", "ok", True),
        ("generate", "failed", True),
        ("rotate", "ok", True),
        ("list", "failed", False),
        ("check", "ok", True),
        ("policy show", "ok", True),
        ("witness list", "ok", True),
    ]
    for entry in entries:
        assert (entry["host"], entry["user"], entry["officer"]) == (
            socket.gethostname(),
            getpass.getuser(),
            "Anchor Test",
        )
        assert entry_hash(entry) == entry["hash"]  # the MAC is outside the hash it covers
    assert a.token.pin not in log.read_text()
    out = a.ok("audit", "verify", log=log)
    assert f"audit log {log}: 8 entries, chain intact; head {entries[-1]['hash']}" in out
    assert (
        f"token '{a.token.label}' (serial {entries[0]['serial']}): 7 entries anchored in it, up to entry 8"
        in out
    )
    assert "not anchored" not in out
    # An unanchored entry after the last anchored one could be cut off unseen: verify counts them.
    assert a.keys("list", log=log, pin_file=bad_pin).returncode == EXIT_UNAVAILABLE
    out = a.ok("audit", "verify", log=log)
    assert (
        "7 entries anchored in it, up to entry 8, as its anchor records; 1 later entry is not anchored" in out
    )


def test_an_edited_entry_is_caught(desks: tuple[Desk, Desk], tmp_path: Path) -> None:
    a, _ = desks
    log = tmp_path / "audit.log"
    entries = _anchored_log(a, log)
    entries[1]["officer"] = "Mallory"
    _write(log, entries)
    a.verify_fails(log, r"line 2 of the audit log .* \(entry 2\) was edited: its hash does not match")


def test_reordered_entries_are_caught(desks: tuple[Desk, Desk], tmp_path: Path) -> None:
    a, _ = desks
    log = tmp_path / "audit.log"
    entries = _anchored_log(a, log)
    _write(log, [entries[0], entries[2], entries[1], entries[3]])
    a.verify_fails(
        log, r"line 2 .*is entry 3 but entry 2 should come next, and it comes later: lines were reordered"
    )


def test_a_log_cut_short_is_caught_without_a_head(desks: tuple[Desk, Desk], tmp_path: Path) -> None:
    a, _ = desks
    log = tmp_path / "audit.log"
    entries = _anchored_log(a, log)
    _write(log, entries[:2])
    assert a.chain_only(log).returncode == 0  # a shorter chain is still a chain ...
    a.verify_fails(  # ... which the token's anchor exposes
        log,
        rf"anchored 4 entries in the audit log {log}, the last being entry 4; the log holds 2 anchored entries,"
        r" up to entry 2, and not entry 4: entries were cut off its end",
    )


def test_an_emptied_log_is_caught(desks: tuple[Desk, Desk], tmp_path: Path) -> None:
    a, _ = desks
    log = tmp_path / "audit.log"
    _anchored_log(a, log, commands=2)
    log.write_text("")
    a.verify_fails(
        log, r"\(0 entries\) is anchored in token .* which anchored 2 entries in it.*: the log was emptied"
    )


def test_a_rewritten_and_rehashed_chain_is_caught(desks: tuple[Desk, Desk], tmp_path: Path) -> None:
    """Whoever rewrites the file can re-hash the chain, but cannot make the MACs, nor hide their absence."""
    a, _ = desks
    log = tmp_path / "audit.log"
    original = _anchored_log(a, log)

    def rehashed(entries: list[dict[str, Any]], keep_macs: bool) -> list[dict[str, Any]]:
        out, prev = [], "0" * 64
        for entry in entries:
            entry = {k: v for k, v in entry.items() if keep_macs or k != "mac"}
            entry["prev"] = prev
            entry["hash"] = prev = entry_hash(entry)
            out.append(entry)
        return out

    forged = [dict(e) for e in original]
    forged[2]["result"] = "failed: never happened"
    _write(log, rehashed(forged, keep_macs=True))
    assert a.chain_only(log).returncode == 0  # the chain is whole again
    a.verify_fails(
        log, r"line 3 of the audit log .* \(entry 3\) claims an anchor in token .* its MAC does not verify"
    )
    _write(log, rehashed(forged, keep_macs=False))
    a.verify_fails(
        log,
        r"no entry of the audit log .* \(4 entries\) is anchored in .*: the log was rewritten or replaced",
    )


def test_a_log_from_another_token_is_caught(desks: tuple[Desk, Desk], tmp_path: Path) -> None:
    a, b = desks
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    _anchored_log(a, log_a, commands=2)
    _anchored_log(b, log_b, commands=2)
    b.ok("audit", "verify", log=log_b)
    message = a.verify_fails(
        log_b, rf"no entry of the audit log {log_b} is anchored in token '{a.token.label}'"
    )
    assert f"its entries are anchored in token '{b.token.label}'" in message
    log_a.write_bytes(log_b.read_bytes())  # A's log replaced by B's
    a.verify_fails(
        log_a, rf"anchored 2 entries in it.*: the log was replaced by a log of token '{b.token.label}'"
    )


def test_a_log_the_token_never_anchored_is_refused(desks: tuple[Desk, Desk], tmp_path: Path) -> None:
    a, _ = desks
    log = tmp_path / "audit.log"
    AuditLog(log).append(action="card init", result="ok")  # unanchored, as iscl card writes
    a.verify_fails(log, r"is anchored in token .*, and the token anchors no log at this path \(it anchors /")


def test_a_recorded_head_may_be_its_first_12_digits(desks: tuple[Desk, Desk], tmp_path: Path) -> None:
    a, _ = desks
    log = tmp_path / "audit.log"
    entries = _anchored_log(a, log, commands=3)

    def verify(head: str) -> subprocess.CompletedProcess[str]:
        return a.chain_only(log, "--head", head)

    done = verify(entries[1]["hash"][:12].upper())
    assert done.returncode == 0, done.stderr
    assert f"the recorded head {entries[1]['hash'][:12].upper()} is entry 2" in done.stdout
    done = verify(entries[1]["hash"][:11])
    assert done.returncode == EXIT_USAGE and "at least its first 12 hex digits" in done.stderr
    assert "Traceback" not in done.stderr
    _write(log, entries[:1])
    done = verify(entries[2]["hash"][:12])
    assert done.returncode == EXIT_FAILURE and "does not contain the recorded head" in done.stderr


def test_verify_with_a_wrong_pin_or_a_missing_token_is_one_sentence(
    desks: tuple[Desk, Desk], tmp_path: Path
) -> None:
    a, _ = desks
    log = tmp_path / "audit.log"
    _anchored_log(a, log, commands=1)
    bad_pin = tmp_path / "bad.pin"
    bad_pin.write_text("not-the-pin\n")
    a.verify_fails(log, r"wrong PIN for PKCS#11 token", status=EXIT_UNAVAILABLE, pin_file=bad_pin)
    a.verify_fails(
        log, r"PKCS#11 token 'no-such-token' not found", status=EXIT_UNAVAILABLE, token="no-such-token"
    )


def test_concurrent_commands_keep_log_and_anchor_consistent(softhsm: SoftHsm, tmp_path: Path) -> None:
    """Five commands at once on a fresh token (which makes its MAC key on first use), on two logs.

    SoftHSM2 2.6 rewrites the token's files at every login and change: a process that loads the module
    meanwhile may not see the token, and a login may fail (SoftHSMv2 issue #573; the key holder scans
    and logs in again, see keyholder/pkcs11.py `find_token` and `log_in`). A command that still fails
    (the anchor's update, about 1 in 200) says so in one sentence, and its entry is not anchored.
    Either way the log and the token's anchor must agree.
    """
    desk = _desk(softhsm, tmp_path, "c")
    shared, other = tmp_path / "shared.log", tmp_path / "other.log"

    def start(log: Path) -> subprocess.Popen[str]:
        command = [sys.executable, "-m", "iscl_hsm", "keys", "list", "--audit-log", str(log)]
        command += ["--token", desk.token.label, "--pin-file", str(desk.pin_file)]
        return subprocess.Popen(
            command, env=desk.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    running = [start(shared), start(shared), start(other), start(shared), start(other)]
    for process in running:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0 or (err.startswith("iscl: ") and err.count("\n") == 1), err
    for log, count in ((shared, 3), (other, 2)):
        desk.ok("list", log=log)  # and one more afterwards, which must agree with what the burst left
        entries = _entries(log)
        assert len(entries) == count + 1
        anchored = [e for e in entries if e.get("mac")]
        assert (
            f"{len(anchored)} entries anchored in it, up to entry {count + 1}, as its anchor records"
            in desk.ok("audit", "verify", log=log)
        )


def test_an_append_interrupted_before_the_token_counted_it(desks: tuple[Desk, Desk], tmp_path: Path) -> None:
    """The line is written first: a crash before the token's update shows, and the next command counts it."""
    a, _ = desks
    log = tmp_path / "audit.log"
    _anchored_log(a, log, commands=2)

    class Interrupted(TokenAnchor):
        def advance(self, *args: Any) -> None:  # the process dies after the line reached the disk
            raise KeyboardInterrupt

    with Pkcs11KeyHolder(a.token.label, a.token.pin, a.token.module) as holder:
        anchor = Interrupted(KeyStore(holder))
        with pytest.raises(KeyboardInterrupt):
            AuditLog(log).append(anchor, action="list", token=anchor.label, serial=anchor.serial, result="ok")
    assert _entries(log)[-1]["mac"]
    out = a.ok("audit", "verify", log=log)
    assert (
        "3 entries anchored in it, up to entry 2, as its anchor records; entry 3 is anchored but not yet counted"
        in out
    )
    a.ok("list", log=log)
    out = a.ok("audit", "verify", log=log)
    assert (
        "4 entries anchored in it, up to entry 4, as its anchor records" in out
        and "not yet counted" not in out
    )


def test_the_audit_mac_key_cannot_be_read(desks: tuple[Desk, Desk], softhsm: SoftHsm, tmp_path: Path) -> None:
    a, _ = desks
    _anchored_log(a, tmp_path / "audit.log", commands=1)
    listing = pkcs11_tool(softhsm, a.token.label, a.token.pin, "--list-objects", "--type", "secrkey")
    assert listing.returncode == 0 and f"label:      {MAC_KEY_LABEL}" in listing.stdout
    done = pkcs11_tool(
        softhsm, a.token.label, a.token.pin, "--read-object", "--type", "secrkey", "--label", MAC_KEY_LABEL
    )
    assert done.returncode != 0 and not done.stdout
    with Pkcs11KeyHolder(a.token.label, a.token.pin, a.token.module) as holder, holder.session() as session:
        keys = list(
            session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: MAC_KEY_LABEL})
        )
        assert len(keys) == 1
        key = keys[0]
        with pytest.raises(p11.AttributeSensitive):
            key[Attribute.VALUE]
        assert [
            key[x]
            for x in (Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.MODIFIABLE, Attribute.PRIVATE)
        ] == [True, False, False, True]
        assert [
            key[x]
            for x in (Attribute.SIGN, Attribute.VERIFY, Attribute.ENCRYPT, Attribute.WRAP, Attribute.DERIVE)
        ] == [True, True, False, False, False]
        with pytest.raises(p11.PKCS11Error):
            key[Attribute.EXTRACTABLE] = True
