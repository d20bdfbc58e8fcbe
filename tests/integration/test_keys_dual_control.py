"""Dual control (issue 19 item 4) on real SoftHSM2 tokens: a policy and witnesses kept in the token.

With the token's policy on, every ceremony command needs a second officer (``--witness``) who types
their own passphrase before anything changes or any custodian sees anything. Switching the policy,
adding and removing witnesses need the SO PIN. The ``iscl keys`` commands run as subprocesses, each
a fresh process, as an officer would run them; the test process reads the token's data objects with
python-pkcs11 to check what is stored there.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pkcs11 import Attribute, ObjectClass

from iscl_hsm.cli.status import EXIT_FAILURE, EXIT_UNAVAILABLE, EXIT_USAGE
from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder
from iscl_hsm.keys.policy import POLICY_APPLICATION, WITNESS_APPLICATION, passphrase_matches

from .conftest import SoftHsm, SoftHsmToken

REPO = Path(__file__).resolve().parents[2]
REQUIRES = r"^iscl: token '[^']+' requires dual control: name a second officer with --witness NAME \(see `iscl keys witness`\)"


@dataclass
class Officer:
    """Alice, the security officer of one token, with its PIN files, Bob's passphrase and an audit log."""

    token: SoftHsmToken
    folder: Path
    env: dict[str, str]

    def file(self, name: str, text: str) -> Path:
        path = self.folder / name
        path.write_text(text + "\n")
        path.chmod(0o600)
        return path

    @property
    def pin_file(self) -> Path:
        return self.folder / "user.pin"

    @property
    def so_pin_file(self) -> Path:
        return self.folder / "so.pin"

    @property
    def bob(self) -> Path:
        """Bob's passphrase file."""
        return self.folder / "bob.passphrase"

    @property
    def audit_log(self) -> Path:
        return self.folder / "audit.log"

    def run(
        self, action: str, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "iscl_hsm", "keys", *action.split()]
        command += ["--token", self.token.label, "--pin-file", str(self.pin_file)]
        command += ["--audit-log", str(self.audit_log), *args]
        return subprocess.run(
            command,
            env=env or self.env,
            cwd=self.folder,
            input=stdin if stdin is not None else "",  # never the terminal: prompts come from --input-fd
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def ok(self, action: str, *args: str, **kwargs: Any) -> str:
        done = self.run(action, *args, **kwargs)
        assert done.returncode == 0, f"{action} {args} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def fails(self, action: str, *args: str, match: str, status: int = EXIT_USAGE, **kwargs: Any) -> str:
        """The command fails with ``status`` and one sentence ``iscl: ...`` (after any prompts) matching ``match``."""
        done = self.run(action, *args, **kwargs)
        assert done.returncode == status, (
            f"{action} {args}: status {done.returncode}\n{done.stdout}\n{done.stderr}"
        )
        lines = [line for line in done.stderr.splitlines() if line.startswith("iscl")]
        assert len(lines) == 1 and done.stderr.strip().endswith(lines[0]), done.stderr
        assert re.search(match, lines[0]), lines[0]
        assert "Traceback" not in done.stderr
        return lines[0]

    def witnessed(self, name: str = "Bob", passphrase: Path | None = None) -> tuple[str, ...]:
        return ("--witness", name, "--witness-passphrase-file", str(passphrase or self.bob))

    def so(self) -> tuple[str, ...]:
        return ("--so-pin-file", str(self.so_pin_file))

    def dual_control(self) -> None:
        """Register Bob and switch dual control on."""
        self.ok("witness add", "Bob", "--passphrase-file", str(self.bob), *self.so())
        self.ok("policy set", "dual-control", "on", *self.so())

    def policy(self, env: dict[str, str] | None = None) -> dict[str, Any]:
        return dict(json.loads(self.ok("policy show", "--json", env=env)))

    def key_versions(self) -> list[tuple[str, int, int]]:
        listing = json.loads(self.ok("list", "--json"))["keys"]
        return [(k["purpose"], k["index"], k["version"]) for k in listing]

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_log.read_text().splitlines()]

    def secrets(self) -> list[str]:
        return [self.token.pin, self.token.so_pin, self.bob.read_text().strip()]

    def data_objects(self, application: str) -> list[dict[Attribute, Any]]:
        """The token's data objects of ``application``, read in this process with python-pkcs11."""
        holder = Pkcs11KeyHolder(self.token.label, self.token.pin, self.token.module)
        try:
            with holder.session() as session:
                found = session.get_objects(
                    {Attribute.CLASS: ObjectClass.DATA, Attribute.APPLICATION: application}
                )
                wanted = [Attribute.TOKEN, Attribute.PRIVATE, Attribute.LABEL, Attribute.VALUE]
                return [obj.get_attributes(wanted) for obj in found]
        finally:
            holder.close()


@pytest.fixture
def officer(softhsm: SoftHsm, tmp_path: Path) -> Iterator[Officer]:
    env = {**softhsm.tool_env(), "PYTHONPATH": str(REPO), "ISCL_OFFICER": "Alice"}
    env.pop("ISCL_PIN", None)
    alice = Officer(softhsm.take(), tmp_path, env)
    alice.file("user.pin", alice.token.pin)
    alice.file("so.pin", alice.token.so_pin)
    alice.file("bob.passphrase", f"bob says {secrets.token_hex(6)}")
    yield alice
    log = alice.audit_log.read_text() if alice.audit_log.exists() else ""
    for secret in alice.secrets():  # no PIN or passphrase in the audit log, whatever the test did
        assert secret not in log


def test_the_policy_needs_the_so_pin_a_witness_to_exist_and_lives_in_the_token(officer: Officer) -> None:
    assert officer.policy()["dual_control"] is False
    # Dual control with nobody to witness would lock every ceremony; the officer alone does not count.
    officer.fails("policy set", "dual-control", "on", *officer.so(), match="no witness other than you yet")
    officer.ok(
        "witness add",
        "alice",
        "--passphrase-file",
        str(officer.file("a.pass", "alice's own words")),
        *officer.so(),
    )
    officer.fails("policy set", "dual-control", "on", *officer.so(), match="no witness other than you yet")
    officer.ok("witness add", "Bob", "--passphrase-file", str(officer.bob), *officer.so())

    wrong = officer.file("wrong.so", "not-the-so-pin")
    message = officer.fails(
        "policy set",
        "dual-control",
        "on",
        "--so-pin-file",
        str(wrong),
        match="wrong SO PIN",
        status=EXIT_UNAVAILABLE,
    )
    assert "not-the-so-pin" not in message
    officer.fails("policy set", "dual-control", "on", match="stdin is not a terminal")  # no SO PIN at all
    assert officer.policy()["dual_control"] is False
    assert officer.data_objects(POLICY_APPLICATION) == []

    assert "dual control on" in officer.ok("policy set", "dual-control", "on", *officer.so())
    # A new process, with another home, data directory and working directory, reads it from the token.
    elsewhere = officer.folder / "elsewhere"
    elsewhere.mkdir()
    env = {**officer.env, "HOME": str(elsewhere), "XDG_DATA_HOME": str(elsewhere)}
    shown = officer.policy(env=env)
    assert (shown["dual_control"], shown["officer"], shown["witness"], shown["witnesses"]) == (
        True,
        "Alice",
        None,
        2,
    )
    assert re.search(r"dual control on, set \S+Z by Alice", officer.ok("policy show"))
    [record] = officer.data_objects(POLICY_APPLICATION)
    assert record[Attribute.TOKEN] and record[Attribute.PRIVATE]
    assert json.loads(bytes(record[Attribute.VALUE]))["dual_control"] is True

    entries = [e for e in officer.audit() if e["action"] == "policy set"]
    assert [e["result"].split(":")[0] for e in entries] == ["failed"] * 4 + ["ok"]
    assert entries[-1]["officer"] == "Alice" and entries[-1]["detail"] == "dual control on"


def test_under_dual_control_a_ceremony_needs_the_right_witness_first(officer: Officer) -> None:
    officer.dual_control()
    generate = ("generate", "--purpose", "auth", "--index", "1")
    officer.fails(*generate, match=REQUIRES)
    wrong = officer.file("wrong.passphrase", "bob says something else")
    message = officer.fails(
        *generate,
        *officer.witnessed("Bob", wrong),
        match=r"^iscl: wrong passphrase for witness 'Bob'; nothing was changed",
        status=EXIT_FAILURE,
    )
    assert "something else" not in message
    officer.fails(
        *generate, *officer.witnessed(" ALICE "), match="the witness must be a second officer, not Alice"
    )
    officer.fails(*generate, *officer.witnessed("Carol"), match="witness 'Carol' is not registered on token")
    assert officer.key_versions() == []

    # The witness is checked before any custodian sees or types anything.
    files = [officer.folder / f"component-{n}" for n in (1, 2)]
    components = ("--components", "2", *[a for f in files for a in ("--component-file", str(f))])
    officer.fails(
        "generate-components",
        "--purpose",
        "auth",
        "--index",
        "1",
        *components,
        *officer.witnessed("Bob", wrong),
        match="wrong passphrase",
        status=EXIT_FAILURE,
    )
    assert not any(f.exists() for f in files)
    officer.fails(
        "import-components",
        "--purpose",
        "auth",
        "--index",
        "1",
        "--components",
        "2",
        "--input-fd",
        "0",
        match=REQUIRES,
        stdin="0123 4567 89AB CDEF\n",
    )
    # An interrupted ceremony, with the right witness: custodian 2 never comes; nothing is stored.
    officer.fails(
        "import-components",
        "--purpose",
        "auth",
        "--index",
        "1",
        "--components",
        "2",
        "--input-fd",
        "0",
        *officer.witnessed(),
        match="the input ended",
        stdin="0123 4567 89AB CDEF\n" * 2 + "y\n\n",
    )
    assert officer.key_versions() == []

    out = officer.ok(*generate, *officer.witnessed("bob"))
    assert "stored iscl-auth-1 version 1" in out
    assert officer.key_versions() == [("auth", 1, 1)]
    entries = [
        e for e in officer.audit() if e["action"] in ("generate", "generate-components", "import-components")
    ]
    assert [(e["witness"], e["result"].split(":")[0]) for e in entries] == [
        (None, "failed"),
        ("Bob", "failed"),
        ("ALICE", "failed"),
        ("Carol", "failed"),
        ("Bob", "failed"),
        (None, "failed"),
        ("Bob", "failed"),
        ("Bob", "ok"),  # as registered, whatever the case typed
    ]
    assert entries[-1]["kcv"] and entries[-1]["officer"] == "Alice"


def test_export_backup_restore_and_delete_under_dual_control(officer: Officer) -> None:
    files = [str(officer.folder / f"transport-{n}") for n in (1, 2)]
    officer.ok(
        "generate-components",
        "--purpose",
        "transport",
        "--index",
        "1",
        "--components",
        "2",
        *[a for f in files for a in ("--component-file", f)],
        *officer.so(),
    )
    officer.ok("generate", "--purpose", "auth", "--index", "1", "--exportable")
    officer.dual_control()

    out = officer.folder / "auth-1.json"
    export = ("export", "--purpose", "auth", "--index", "1", "--wrap-with", "1", "--out", str(out))
    officer.fails(*export, match=REQUIRES)
    assert not out.exists()
    officer.ok(*export, *officer.witnessed())
    assert json.loads(out.read_text())["purpose"] == "auth"

    saved = officer.folder / "backup.json"
    backup = ("backup", "--wrap-with", "1", "--out", str(saved))
    officer.fails(*backup, match=REQUIRES)
    assert not saved.exists()
    officer.ok(*backup, *officer.witnessed())
    restore = ("restore", str(saved), "--replace")
    officer.fails(*restore, match=REQUIRES)
    officer.ok(*restore, *officer.witnessed())

    delete = ("delete", "--purpose", "auth", "--index", "1", "--input-fd", "0")
    officer.fails(*delete, match=REQUIRES, stdin="y\n")
    # The witness types at the same prompt stream as the confirmation, first.
    officer.fails(
        *delete,
        "--witness",
        "Bob",
        match="wrong passphrase",
        status=EXIT_FAILURE,
        stdin="bob says nothing\ny\n",
    )
    assert ("auth", 1, 1) in officer.key_versions()
    done = officer.run(*delete, "--witness", "Bob", stdin=officer.bob.read_text() + "y\n")
    assert done.returncode == 0, done.stderr
    assert "passphrase of witness 'Bob' (hidden):" in done.stderr
    assert officer.key_versions() == [("transport", 1, 1)]
    entries = [e for e in officer.audit() if e["action"] in ("export", "delete")]
    assert [(e["action"], e["witness"], e["result"].split(":")[0]) for e in entries] == [
        ("export", None, "failed"),
        ("export", "Bob", "ok"),
        ("delete", None, "failed"),
        ("delete", "Bob", "failed"),
        ("delete", "Bob", "ok"),
    ]


def test_retiring_early_needs_a_witness_and_retiring_when_due_does_not(officer: Officer) -> None:
    """The end of a grace period was approved with its rotation; cutting it short (--now) is not."""
    officer.ok("generate", "--purpose", "enc", "--index", "2")
    officer.dual_control()
    officer.ok("rotate", "--purpose", "enc", "--index", "2", "--grace", "7d", *officer.witnessed())
    assert "no previous key version is due" in officer.ok("retire")  # nothing due yet; no witness needed
    early = ("retire", "--now", "--yes")
    officer.fails(*early, match=REQUIRES)
    officer.fails(*early, *officer.witnessed(passphrase=officer.file("guess", "bob says nothing")),
                  match="wrong passphrase for witness 'Bob'; nothing was changed", status=EXIT_FAILURE)  # fmt: skip
    assert officer.key_versions() == [("enc", 2, 1), ("enc", 2, 2)]
    assert "retired iscl-enc-2 version 1" in officer.ok(*early, *officer.witnessed())
    assert officer.key_versions() == [("enc", 2, 2)]
    entries = [e for e in officer.audit() if e["action"] == "retire"]
    assert [(e["witness"], e["result"].split(":")[0]) for e in entries] == [
        (None, "ok"), (None, "failed"), ("Bob", "failed"), ("Bob", "ok"),
    ]  # fmt: skip


def test_switching_dual_control_off_needs_a_witness_and_the_so_pin(officer: Officer) -> None:
    officer.dual_control()
    officer.fails("policy set", "dual-control", "off", *officer.so(), match=REQUIRES)
    wrong = officer.file("wrong.so", "not-the-so-pin")
    officer.fails(
        "policy set",
        "dual-control",
        "off",
        "--so-pin-file",
        str(wrong),
        *officer.witnessed(),
        match="wrong SO PIN",
        status=EXIT_UNAVAILABLE,
    )
    assert officer.policy()["dual_control"] is True
    officer.ok("policy set", "dual-control", "off", *officer.so(), *officer.witnessed())
    shown = officer.policy()
    assert (shown["dual_control"], shown["officer"], shown["witness"]) == (False, "Alice", "Bob")
    assert len(officer.data_objects(POLICY_APPLICATION)) == 1  # the older setting is gone

    officer.ok("generate", "--purpose", "auth", "--index", "1")  # no witness needed any more
    # Still recorded when named; an unregistered name is noted as unchecked, a registered one is checked.
    officer.ok("generate", "--purpose", "auth", "--index", "2", "--witness", "Carol")
    officer.fails(
        "generate",
        "--purpose",
        "auth",
        "--index",
        "3",
        *officer.witnessed("Bob", wrong),
        match="wrong passphrase",
        status=EXIT_FAILURE,
    )
    entries = [e for e in officer.audit() if e["action"] == "generate"]
    assert [(e["witness"], e["result"].split(":")[0]) for e in entries] == [
        (None, "ok"),
        ("Carol", "ok"),
        ("Bob", "failed"),
    ]
    assert "witness Carol is not registered on the token, not checked" in entries[1]["detail"]
    assert officer.key_versions() == [("auth", 1, 1), ("auth", 2, 1)]


def test_witnesses_are_added_and_removed_with_the_so_pin(officer: Officer) -> None:
    add = ("witness add", "Bob")
    wrong = officer.file("wrong.so", "not-the-so-pin")
    officer.fails(
        *add,
        "--passphrase-file",
        str(officer.bob),
        "--so-pin-file",
        str(wrong),
        match="wrong SO PIN",
        status=EXIT_UNAVAILABLE,
    )
    short = officer.file("short", "1234567")
    officer.fails(*add, "--passphrase-file", str(short), *officer.so(), match="at least 8 characters")
    officer.fails(
        *add, "--passphrase-file", str(officer.pin_file), *officer.so(), match="not a PIN of the token"
    )
    officer.fails(
        *add, "--input-fd", "0", *officer.so(), stdin="one passphrase\nanother one\n", match="differ",
        status=EXIT_FAILURE,
    )
    officer.fails("witness add", "Bob/2", *officer.so(), match="is not a name of 1 to 64 letters")
    assert json.loads(officer.ok("witness list", "--json"))["witnesses"] == []

    passphrase = officer.bob.read_text().strip()
    done = officer.run(*add, "--input-fd", "0", *officer.so(), stdin=f"{passphrase}\n{passphrase}\n")
    assert done.returncode == 0, done.stderr
    assert passphrase not in done.stdout + done.stderr
    officer.fails(
        "witness add",
        "BOB",
        "--passphrase-file",
        str(officer.bob),
        *officer.so(),
        match="witness 'BOB' is already registered",
    )
    [bob] = json.loads(officer.ok("witness list", "--json"))["witnesses"]
    assert (bob["name"], bob["officer"], bob["damaged"]) == ("Bob", "Alice", False)
    officer.ok("policy set", "dual-control", "on", *officer.so())

    # Under dual control, changing the witnesses needs a witness too.
    carol = officer.file("carol.passphrase", "carol's own passphrase")
    officer.fails("witness add", "Carol", "--passphrase-file", str(carol), *officer.so(), match=REQUIRES)
    officer.ok("witness add", "Carol", "--passphrase-file", str(carol), *officer.so(), *officer.witnessed())
    assert "Carol" in officer.ok("witness list")
    officer.fails(
        "witness remove", "Dave", *officer.so(), *officer.witnessed(), match="'Dave' is not registered"
    )
    officer.ok("witness remove", "Bob", *officer.so(), *officer.witnessed("Carol", carol))
    officer.fails(
        "witness remove",
        "Carol",
        *officer.so(),
        *officer.witnessed("Carol", carol),
        match="witness 'Carol' is the last one on token .* add another witness first, or switch dual",
    )
    officer.fails(
        "witness remove",
        "Carol",
        "--so-pin-file",
        str(wrong),
        *officer.witnessed("Carol", carol),
        match="last one",
    )  # (checked before the SO PIN)
    assert [w["name"] for w in json.loads(officer.ok("witness list", "--json"))["witnesses"]] == ["Carol"]
    entries = [e for e in officer.audit() if e["action"].startswith("witness ") and e["result"] == "ok"]
    assert [(e["action"], e["detail"], e["witness"]) for e in entries] == [
        ("witness list", "0 witnesses", None),
        ("witness add", "witness Bob", None),
        ("witness list", "1 witness", None),
        ("witness add", "witness Carol", "Bob"),
        ("witness list", "2 witnesses", None),
        ("witness remove", "witness Bob", "Carol"),
        ("witness list", "1 witness", None),
    ]


def test_a_witness_record_holds_a_salted_slow_hash_never_the_passphrase(officer: Officer) -> None:
    passphrase = officer.bob.read_text().strip()
    same = officer.file("same.passphrase", passphrase)  # Carol chose the same words: other salt, other hash
    officer.ok("witness add", "Bob", "--passphrase-file", str(officer.bob), *officer.so())
    officer.ok("witness add", "Carol", "--passphrase-file", str(same), *officer.so())
    objects = officer.data_objects(WITNESS_APPLICATION)
    assert sorted(str(o[Attribute.LABEL]) for o in objects) == ["iscl-witness-Bob", "iscl-witness-Carol"]
    stored = []
    for obj in objects:
        assert obj[Attribute.TOKEN] and obj[Attribute.PRIVATE]
        value = bytes(obj[Attribute.VALUE])
        for form in (passphrase.encode(), passphrase.encode().hex().encode(), passphrase.encode("utf-16-le")):
            assert form not in value
        record = json.loads(value)
        stored.append(record["hash"])
        assert record["hash"]["kdf"] == "scrypt" and record["hash"]["n"] >= 2**17 and record["hash"]["r"] >= 8
        assert len(bytes.fromhex(record["hash"]["salt"])) == 16
        assert passphrase_matches(record["hash"], passphrase)
        assert not passphrase_matches(record["hash"], passphrase + "!")
    assert stored[0]["salt"] != stored[1]["salt"] and stored[0]["hash"] != stored[1]["hash"]


def test_a_damaged_policy_counts_as_on_and_a_damaged_witness_never_passes(officer: Officer) -> None:
    officer.ok("witness add", "Bob", "--passphrase-file", str(officer.bob), *officer.so())
    holder = Pkcs11KeyHolder(officer.token.label, officer.token.pin, officer.token.module)
    try:
        with holder.session() as session:
            data = {Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: True, Attribute.PRIVATE: True}
            session.create_object(
                {**data, Attribute.APPLICATION: POLICY_APPLICATION, Attribute.VALUE: b"{off"}
            )
    finally:
        holder.close()
    shown = officer.policy()
    assert (shown["dual_control"], shown["damaged"]) == (True, True)
    assert "damaged, so it counts as on" in officer.ok("policy show")
    officer.fails("generate", "--purpose", "auth", "--index", "1", match=REQUIRES)
    officer.ok("policy set", "dual-control", "off", *officer.so(), *officer.witnessed())  # repairs it
    [record] = officer.data_objects(POLICY_APPLICATION)
    assert json.loads(bytes(record[Attribute.VALUE]))["dual_control"] is False

    holder = Pkcs11KeyHolder(officer.token.label, officer.token.pin, officer.token.module)
    try:
        with holder.session() as session:
            [bob] = session.get_objects(
                {Attribute.CLASS: ObjectClass.DATA, Attribute.APPLICATION: WITNESS_APPLICATION}
            )
            bob.destroy()
            session.create_object(
                {
                    **data,
                    Attribute.APPLICATION: WITNESS_APPLICATION,
                    Attribute.LABEL: "iscl-witness-Bob",
                    Attribute.VALUE: b'{"name": "Bob", "hash": "none"}',
                }
            )
    finally:
        holder.close()
    officer.fails(
        "generate",
        "--purpose",
        "auth",
        "--index",
        "1",
        *officer.witnessed(),
        match=r"the record of witness 'Bob' on token '[^']+' is damaged; remove it",
        status=EXIT_FAILURE,
    )
    assert officer.key_versions() == []
    assert "damaged record" in officer.ok("witness list")
    officer.ok("witness remove", "Bob", *officer.so())
    assert officer.data_objects(WITNESS_APPLICATION) == []
