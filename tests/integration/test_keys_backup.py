"""`iscl keys backup` and `iscl keys restore` on real SoftHSM2 tokens (issue 19, item 5).

Site A holds exportable auth and enc keys (auth key 1 rotated: two versions) and a non-exportable
key; peer site B got A's current keys by export and import-wrapped; C is a fresh token that gets
only the transport key, from the custodians' component forms, as a replacement token would. A's
backup restored into C gives the same versions, KCVs and records, and C runs a link with B. A token
with another transport key, an edited backup (even one re-sealed by someone holding the transport
key), a token whose keys are in use, and a token with nothing exportable are refused, and nothing
is installed; a restore interrupted half-way leaves the token as it was.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from iscl_hsm.cli.status import EXIT_USAGE
from iscl_hsm.engine import Config
from iscl_hsm.keyholder.data_objects import data_objects
from iscl_hsm.keyholder.key_records import RECORD_APPLICATION
from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder
from iscl_hsm.keys import backup as backup_module
from iscl_hsm.keys.backup import parse_backup, restore
from iscl_hsm.keys.binding import bind
from iscl_hsm.keys.store import KeyStore, create_record
from tests.helpers import exchange

from .conftest import SoftHsm
from .test_keys_ceremony import Site, _close, _handshake, make_sites, so_pin_file, transport_ceremony


@dataclass
class Sites:
    a: Site  # the token that is backed up
    b: Site  # its peer
    c: Site  # a fresh token holding only the transport key
    d: Site  # a token whose transport key 1 is another key
    folder: Path
    backup: Path


def _keys_on(site: Site) -> list[dict[str, Any]]:
    return list(json.loads(site.keys("list", "--json").stdout)["keys"])


def _audit(site: Site) -> list[dict[str, Any]]:
    return [json.loads(line) for line in site.audit_log.read_text().splitlines()]


def _summary(site: Site) -> list[tuple[Any, ...]]:
    """What a restore must reproduce, per auth and enc key version."""
    return [
        (k["purpose"], k["index"], k["version"], k["algorithm"], k["kcv"], k["created"], k["retire_after"],
         k["current"])
        for k in _keys_on(site)
        if k["purpose"] != "transport"
    ]  # fmt: skip


def _transport_from_forms(site: Site, folder: Path) -> None:
    """import-components of transport key 1 from the forms A's custodians filled in."""
    files = [folder / f"transport-1-component-{n}" for n in (1, 2)]
    site.keys(
        "import-components", "--purpose", "transport", "--index", "1", "--components", "2",
        *[arg for f in files for arg in ("--component-file", str(f))],
        "--so-pin-file", str(so_pin_file(site, folder)), "--yes",
    )  # fmt: skip


@pytest.fixture(scope="module")
def sites(softhsm: SoftHsm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    folder = tmp_path_factory.mktemp("backup")
    a, b, c, d = make_sites(softhsm, folder, "Backup Test", "abcd")
    transport_ceremony(a, b, 1, folder)
    _transport_from_forms(c, folder)
    other = [folder / f"other-transport-{n}" for n in (1, 2)]
    d.keys(
        "generate-components", "--purpose", "transport", "--index", "1", "--components", "2",
        *[arg for f in other for arg in ("--component-file", str(f))], "--so-pin-file", str(so_pin_file(d, folder)),
    )  # fmt: skip
    a.keys("generate", "--purpose", "auth", "--index", "1", "--exportable")
    a.keys("rotate", "--purpose", "auth", "--index", "1", "--grace", "7d", "--exportable")
    a.keys("generate", "--purpose", "enc", "--index", "1", "--exportable")
    a.keys("generate", "--purpose", "auth", "--index", "3")  # non-exportable: cannot be backed up
    for purpose in ("auth", "enc"):  # B, the peer, gets A's current keys
        wrapped = folder / f"{purpose}-1.json"
        a.keys("export", "--purpose", purpose, "--index", "1", "--wrap-with", "1", "--out", str(wrapped))
        b.keys("import-wrapped", str(wrapped))
    yield Sites(a, b, c, d, folder, folder / "a.backup")


def test_a_backup_restored_into_a_fresh_token_runs_a_link_with_the_peer(sites: Sites) -> None:
    a, b, c = sites.a, sites.b, sites.c
    out = a.keys("backup", "--wrap-with", "iscl-transport-1", "--out", str(sites.backup)).stdout
    assert sites.backup.stat().st_mode & 0o777 == 0o600
    for name in ("iscl-auth-1 version 1", "iscl-auth-1 version 2", "iscl-enc-1 version 1"):
        assert f"backed up {name} (exportable (trusted wrap only))" in out, out
    assert "left out: iscl-auth-3 version 1 was created non-exportable" in out
    assert (
        "left out: iscl-transport-1 version 1 is a transport key: transport keys never leave a token" in out
    )
    assert f"3 key versions written to {sites.backup}, wrapped under iscl-transport-1" in out
    assert "note: transport keys are never backed up" in out
    document = json.loads(sites.backup.read_text())
    assert document["format"] == "iscl-hsm key backup 1" and len(document["keys"]) == 3
    assert all(entry["format"] == "iscl-hsm wrapped key 2" and "mac" in entry for entry in document["keys"])
    records = {(e["purpose"], e["index"], e["version"]): e["record"] for e in document["keys"]}
    assert records[("auth", 1, 1)]["retire_after"] and records[("auth", 1, 2)]["origin"] == "generated"
    done = a.keys("backup", "--wrap-with", "1", "--out", str(sites.backup), check=False)
    assert done.returncode == EXIT_USAGE and "exists already; name a new file" in done.stderr
    assert json.loads(sites.backup.read_text()) == document  # never overwritten

    out = c.keys("restore", str(sites.backup)).stdout
    assert f"restored iscl-auth-1 version 2 on token '{c.token.label}': des, exportable" in out, out
    assert "not in the backup: iscl-auth-3 version 1 was created non-exportable" in out
    assert _summary(c) == [s for s in _summary(a) if s[:2] != ("auth", 3)]
    assert {k["kind"] for k in _keys_on(c) if k["purpose"] != "transport"} == {"exportable"}

    pair = _handshake(c, b, Config(auth_key_id=1, enc_key_id=1))
    try:
        assert not pair.errors, pair.errors
        exchange(pair, [b"CT image from hospital B" * 100], [b"report from the restored token"])
    finally:
        _close(pair)

    # Once more: the keys are on C now, so only --replace restores, and to the same state.
    done = c.keys("restore", str(sites.backup), check=False)
    assert done.returncode == EXIT_USAGE and "already holds iscl-auth-1, iscl-enc-1" in done.stderr, done.stderr
    assert "pass --replace" in done.stderr
    before = _summary(c)
    c.keys("restore", str(sites.backup), "--replace")
    assert _summary(c) == before
    backed_up = [e for e in _audit(a) if e["action"] == "backup"]
    assert backed_up[0]["result"] == "ok" and "exists already" in backed_up[1]["result"]
    assert "3 key versions wrapped under iscl-transport-1" in backed_up[0]["detail"]
    results = [e["result"] for e in _audit(c) if e["action"] == "restore"]
    assert results[0] == results[2] == "ok" and results[1].startswith("failed: ") and len(results) == 3
    for site in (a, c):
        assert site.token.pin not in site.audit_log.read_text()


def _resealed(site: Site, document: dict[str, Any], entry: int | None = None) -> dict[str, Any]:
    """``document`` bound again under ``site``'s transport key 1 (and entry ``entry`` too): what only
    someone holding the transport key could do; restore must still check every entry."""
    holder = Pkcs11KeyHolder(site.token.label, site.token.pin)
    try:
        store = KeyStore(holder)
        with holder.session() as session:
            transport = store.transport_key(session, 1)[0]

            def seal(part: dict[str, Any]) -> dict[str, Any]:
                return bind(
                    session, transport, {k: v for k, v in part.items() if k not in ("binding", "mac")}
                )

            if entry is not None:
                document["keys"][entry] = seal(document["keys"][entry])
            return seal(document)
    finally:
        holder.close()


def _refused(site: Site, folder: Path, name: str, document: dict[str, Any] | str, match: str) -> None:
    before = _keys_on(site)
    path = folder / name
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    done = site.keys("restore", str(path), check=False)
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iscl: ") and match in lines[0], done.stderr
    assert _keys_on(site) == before


def test_bad_backups_and_tokens_install_nothing(sites: Sites) -> None:
    a, b, d, folder = sites.a, sites.b, sites.d, sites.folder
    path = folder / "unhappy.backup"
    a.keys("backup", "--wrap-with", "1", "--out", str(path))
    good = json.loads(path.read_text())
    # A token whose transport key 1 is another key.
    _refused(d, folder, "other-transport.backup", good,
             "wrong transport key: the backup was wrapped under a transport key with KCV")  # fmt: skip
    # Edits. B holds iscl-auth-1 and iscl-enc-1: the checks come before that refusal.
    edited = copy.deepcopy(good)
    edited["keys"][1]["index"] = 2
    _refused(
        b, folder, "edited.backup", edited, "the backup was altered after it was made: its fields do not"
    )
    dropped = dict(good, keys=good["keys"][:2])
    _refused(b, folder, "dropped.backup", dropped, "the backup was altered after it was made")
    # Re-sealed by someone with the transport key: the last entry's record, then its KCV, edited.
    last = len(good["keys"]) - 1
    edited = copy.deepcopy(good)
    edited["keys"][last]["record"]["origin"] = "components"
    _refused(b, folder, "resealed.backup", _resealed(a, edited),
             f"entry {last + 1} of the backup (iscl-enc-1 version 1) was altered after the backup was made")  # fmt: skip
    edited = copy.deepcopy(good)
    edited["keys"][last]["kcv"] = "ABCDEF"
    _refused(b, folder, "wrong-kcv.backup", _resealed(a, edited, entry=last),
             "the key unwrapped from it has KCV")  # fmt: skip
    # Not a backup at all, or not JSON.
    _refused(b, folder, "export.json", (folder / "auth-1.json").read_text(), "is not a backup file")
    _refused(b, folder, "not-json.backup", "{ nope", "(it is not JSON)")
    # A token whose keys cannot leave it (B imported them non-extractable).
    out = folder / "nothing.backup"
    done = b.keys("backup", "--wrap-with", "1", "--out", str(out), check=False)
    assert done.returncode == EXIT_USAGE and not out.exists(), done.stderr
    assert "holds no key that can leave it" in done.stderr and "create keys with --exportable" in done.stderr
    assert "keep the component forms" in done.stderr


def _token_objects(site: Site) -> tuple[list[tuple[str, int, int]], int]:
    """The ISCL key objects on ``site``'s token, and how many key records (duplicates counted)."""
    holder = Pkcs11KeyHolder(site.token.label, site.token.pin)
    try:
        with holder.session() as session:
            keys = sorted((p, i, v) for p, i, v, _ in KeyStore(holder).objects(session))
            return keys, len(list(data_objects(session, RECORD_APPLICATION)))
    finally:
        holder.close()


@pytest.mark.parametrize("records_made", [0, 2])
def test_a_restore_interrupted_half_way_leaves_the_token_as_it_was(
    sites: Sites, monkeypatch: pytest.MonkeyPatch, records_made: int
) -> None:
    """Ctrl-C while the keys go in (after the first key, or after two keys and their records): every
    object the restore made is destroyed again, and what the token held before is still there."""
    a, c = sites.a, sites.c
    path = sites.folder / f"interrupted-{records_made}.backup"
    a.keys("backup", "--wrap-with", "1", "--out", str(path))
    document = parse_backup(path.read_text(), str(path))
    before = _token_objects(c), _keys_on(c)
    made: list[dict[str, Any]] = []

    def interrupted(session: Any, record: dict[str, Any]) -> Any:
        if len(made) == records_made:
            raise KeyboardInterrupt
        made.append(record)
        return create_record(session, record)

    monkeypatch.setattr(backup_module, "create_record", interrupted)
    holder = Pkcs11KeyHolder(c.token.label, c.token.pin)
    try:
        with pytest.raises(KeyboardInterrupt):
            restore(KeyStore(holder), document, replace=True)
    finally:
        holder.close()
    assert len(made) == records_made
    assert (_token_objects(c), _keys_on(c)) == before
