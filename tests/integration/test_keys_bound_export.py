"""Wrapped-key files are bound to the transport key: no field can be edited (issue 19, item 1).

Two sites on real SoftHSM2 tokens share transport key 1 (a component ceremony with the SO PIN).
Site A exports exportable keys; site B imports them with ``iscl keys import-wrapped``. The attack
of the issue (edit purpose and index, recompute the SHA-256 checksum) and an edit of every other
field, of the wrapped bytes, of the MAC and of the wrapped MAC key are refused with one sentence,
and nothing is installed; a version 1 file is refused; an untouched file installs keys that run a
link.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from iscl_hsm.engine import Config
from tests.helpers import exchange

from .conftest import SoftHsm
from .test_keys_ceremony import Site, _close, _handshake, make_sites, transport_ceremony


@pytest.fixture(scope="module")
def linked(softhsm: SoftHsm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, Site, Path]]:
    """Sites A and B holding the same trusted transport key 1, and a folder for their files."""
    folder = tmp_path_factory.mktemp("bound-export")
    a, b = make_sites(softhsm, folder, "Bound Export Test")
    transport_ceremony(a, b, 1, folder)
    yield a, b, folder


def _export(site: Site, purpose: str, index: int, out: Path) -> dict[str, Any]:
    site.keys("generate", "--purpose", purpose, "--index", str(index), "--exportable")
    site.keys(
        "export", "--purpose", purpose, "--index", str(index), "--wrap-with", "iscl-transport-1",
        "--out", str(out),
    )  # fmt: skip
    assert out.stat().st_mode & 0o777 == 0o600
    document: dict[str, Any] = json.loads(out.read_text())
    return document


def _keys_on(site: Site) -> list[tuple[str, int, int, str]]:
    listing = json.loads(site.keys("list", "--json").stdout)
    return [(k["purpose"], k["index"], k["version"], k["kcv"]) for k in listing["keys"]]


def _refused(site: Site, document: dict[str, Any], path: Path, match: str) -> str:
    """import-wrapped of ``document`` fails with one sentence containing ``match`` (returned without its
    error code); nothing changes."""
    before = _keys_on(site)
    path.write_text(json.dumps(document, indent=2))
    done = site.keys("import-wrapped", str(path), check=False)
    assert done.returncode != 0, f"{path.name} was accepted:\n{done.stdout}"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iscl: "), done.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in done.stderr
    assert _keys_on(site) == before
    return re.sub(r" \[ISCL \d+ \w+\]$", "", lines[0])


def _v1_checksum(document: dict[str, Any]) -> str:
    """The unkeyed checksum of version 1 files: anyone can recompute it."""
    body = {k: v for k, v in document.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _flip(text: str, at: int = -1) -> str:
    """``text`` (hex) with one hex digit changed."""
    digits = list(text)
    digits[at] = "0" if digits[at] != "0" else "1"
    return "".join(digits)


ALTERED = "the file was altered after export: its fields do not match the MAC made under iscl-transport-1"
AGAIN = "ask the other site to export it again"


def test_the_attack_of_the_issue_is_refused_and_nothing_is_installed(
    linked: tuple[Site, Site, Path],
) -> None:
    """auth key 2 relabelled as enc key 5, the checksum recomputed: one key would hold two roles."""
    a, b, folder = linked
    good = _export(a, "auth", 2, folder / "auth-2.json")
    forged = dict(good, purpose="enc", index=5)
    forged["checksum"] = _v1_checksum(forged)
    message = _refused(b, forged, folder / "forged.json", ALTERED)
    assert message.endswith(AGAIN)
    # The same edit passed off as a version 1 file, whose checksum is all there is to check.
    old = {k: v for k, v in forged.items() if k not in ("binding", "mac", "checksum")}
    old["format"] = "iscl-hsm wrapped key 1"
    old["checksum"] = _v1_checksum(old)
    message = _refused(b, old, folder / "forged-v1.json", "written by an older iscl-hsm")
    assert message.endswith(f"{AGAIN} with this version")
    assert not [k for k in _keys_on(b) if k[:2] in (("enc", 5), ("auth", 2))]
    # The refusals are in B's audit log, which holds no key material of the file.
    entries = [json.loads(line) for line in b.audit_log.read_text().splitlines()]
    refusals = [e for e in entries if e["action"] == "import-wrapped"][-2:]
    assert [e["result"].split(":")[0] for e in refusals] == ["failed", "failed"]
    assert good["wrapped"] not in b.audit_log.read_text()
    assert good["binding"]["wrapped_mac_key"] not in b.audit_log.read_text()


EDITS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "purpose": (lambda d: d.update(purpose="auth"), ALTERED),
    "index": (lambda d: d.update(index=5), ALTERED),
    "version": (lambda d: d.update(version=2), ALTERED),
    "algorithm": (lambda d: d.update(algorithm="des3"), ALTERED),
    "kcv": (lambda d: d.update(kcv=_flip(d["kcv"])), ALTERED),
    "wrapping mechanism": (lambda d: d["wrapping"].update(mechanism="CKM_AES_KEY_WRAP"), ALTERED),
    "source token": (lambda d: d["source"].update(token="another-hospital"), ALTERED),
    "source serial": (lambda d: d["source"].update(serial="0000000000000000"), ALTERED),
    "exported time": (lambda d: d.update(exported="2020-01-01T00:00:00Z"), ALTERED),
    "an added field": (lambda d: d.update(note="harmless"), ALTERED),
    "wrapped bytes": (lambda d: d.update(wrapped=_flip(d["wrapped"], 20)), ALTERED),
    "the MAC": (lambda d: d.update(mac=_flip(d["mac"])), ALTERED),
    "the wrapped MAC key": (
        lambda d: d["binding"].update(wrapped_mac_key=_flip(d["binding"]["wrapped_mac_key"], 20)),
        "the file was altered after export: its MAC key does not unwrap under iscl-transport-1",
    ),
    "transport KCV": (
        lambda d: d["wrapping"].update(transport_kcv=_flip(d["wrapping"]["transport_kcv"])),
        "wrong transport key: the file was wrapped under a transport key with KCV",
    ),
    "transport label": (
        lambda d: d["wrapping"].update(transport_label="iscl-transport-2"),
        "transport key iscl-transport-2 is not on token",
    ),
    "binding removed": (lambda d: d.pop("binding"), "(a field is missing or malformed)"),
    "MAC removed": (lambda d: d.pop("mac"), "(a field is missing or malformed)"),
}


def test_an_edit_of_any_field_is_refused_and_nothing_is_installed(linked: tuple[Site, Site, Path]) -> None:
    a, b, folder = linked
    good = _export(a, "enc", 3, folder / "enc-3.json")
    assert good["format"] == "iscl-hsm wrapped key 2"
    assert good["binding"]["mechanism"] == "CKM_SHA256_HMAC" and len(bytes.fromhex(good["mac"])) == 32
    for name, (edit, match) in EDITS.items():
        document = copy.deepcopy(good)
        edit(document)
        assert document != good, name
        _refused(b, document, folder / f"edited-{name.replace(' ', '-')}.json", match)
    # The MAC key of one file does not bind another: A's auth-3 file with enc-3's binding and MAC.
    other = _export(a, "auth", 3, folder / "auth-3.json")
    spliced = dict(other, binding=good["binding"], mac=good["mac"])
    _refused(b, spliced, folder / "spliced.json", ALTERED)
    assert not [k for k in _keys_on(b) if k[0] != "transport"]
    # The untouched file is still good.
    path = folder / "enc-3-good.json"
    path.write_text(json.dumps(good))
    assert f"KCV {good['kcv']}" in b.keys("import-wrapped", str(path)).stdout


def test_bound_files_install_keys_that_run_a_link(linked: tuple[Site, Site, Path]) -> None:
    a, b, folder = linked
    for purpose in ("auth", "enc"):
        document = _export(a, purpose, 4, folder / f"{purpose}-4.json")
        out = b.keys("import-wrapped", str(folder / f"{purpose}-4.json")).stdout
        assert f"imported iscl-{purpose}-4 version 1" in out and f"KCV {document['kcv']}" in out
        assert (purpose, 4, 1, document["kcv"]) in _keys_on(b)
    pair = _handshake(a, b, Config(auth_key_id=4, enc_key_id=4))
    try:
        assert not pair.errors, pair.errors
        exchange(pair, [b"CT image from hospital B" * 100], [b"report from hospital A"])
    finally:
        _close(pair)
