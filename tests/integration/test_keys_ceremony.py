"""A key ceremony between two hospitals, end to end on real SoftHSM2 tokens.

Hospital A runs ``iscl keys generate-components``; hospital B enters the same components with
``iscl keys import-components``; both report the same KCVs; then an ISCL handshake and transfer
between a server on token A and a client on token B succeeds (engine Connections driven by hand,
keys in the tokens). With one wrong component the handshake fails with the authentication error.
OpenSC's pkcs11-tool, an independent client, sees the documented labels and IDs and cannot read a
key value. The ``iscl keys`` commands run as subprocesses (``python3 -m iscl_hsm keys``), as an
officer would run them; the pool tokens exist before those processes start.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from iscl_hsm.crypto.des import DesKey, kcv
from iscl_hsm.engine import Config, Profile
from iscl_hsm.errors import ErrorCode
from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder, TokenDesKey
from iscl_hsm.keys.anchor import MAC_KEY_LABEL
from tests.helpers import ConnectionPair, exchange

from .conftest import SoftHsm, SoftHsmToken, pkcs11_tool, secret_key_objects

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Site:
    """One hospital: its token, PIN file and audit log, and a way to run ``iscl keys`` there."""

    token: SoftHsmToken
    pin_file: Path
    audit_log: Path
    env: dict[str, str]

    def argv(self, *args: str) -> list[str]:
        """The command line of ``iscl keys ARGS`` at this site."""
        return [
            sys.executable,
            "-m",
            "iscl_hsm",
            "keys",
            args[0],
            "--token",
            self.token.label,
            "--pin-file",
            str(self.pin_file),
            "--audit-log",
            str(self.audit_log),
            *args[1:],
        ]

    def keys(
        self, *args: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.argv(*args),
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check:
            assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done


@pytest.fixture(scope="module")
def sites(softhsm: SoftHsm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, Site]]:
    if shutil.which("pkcs11-tool") is None:
        pytest.fail("OpenSC's pkcs11-tool is not installed: apt-get install opensc")
    a, b = make_sites(softhsm, tmp_path_factory.mktemp("ceremony"), "Ceremony Test")
    yield a, b


def make_sites(softhsm: SoftHsm, folder: Path, officer: str, names: str = "ab") -> list[Site]:
    """A site per letter of ``names`` on a fresh pool token, its PIN file (0600) and audit log in ``folder``."""
    env = {**softhsm.tool_env(), "PYTHONPATH": str(REPO), "ISCL_OFFICER": officer}
    env.pop("ISCL_PIN", None)
    made = []
    for name in names:
        token = softhsm.take()
        pin_file = folder / f"{name}.pin"
        pin_file.write_text(token.pin + "\n")
        pin_file.chmod(0o600)
        made.append(Site(token, pin_file, folder / f"{name}-audit.log", env))
    return made


def _kcv(output: str, what: str = "key KCV") -> str:
    match = re.search(rf"{what}: ([0-9A-F]{{6}})", output)
    assert match, f"no '{what}' in:\n{output}"
    return match.group(1)


def _ceremony(
    a: Site,
    b: Site,
    purpose: str,
    index: int,
    folder: Path,
    count: int = 2,
    corrupt: int | None = None,
    a_options: tuple[str, ...] = (),
    b_options: tuple[str, ...] = (),
) -> tuple[str, str]:
    """generate-components on A (with ``a_options``), import-components on B (with ``b_options``,
    component ``corrupt`` changed); both KCVs."""
    files = [folder / f"{purpose}-{index}-component-{n}" for n in range(1, count + 1)]
    done = a.keys(
        "generate-components",
        "--purpose",
        purpose,
        "--index",
        str(index),
        "--components",
        str(count),
        *[arg for f in files for arg in ("--component-file", str(f))],
        *a_options,
    )
    kcv_a = _kcv(done.stdout)
    component_kcvs = re.findall(r"component \d written to .*, KCV ([0-9A-F]{6})", done.stdout)
    assert len(component_kcvs) == count
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o600
        assert kcv_a not in path.read_text().split("\n", 2)[2]  # the file holds the component, not the key
    if corrupt is not None:  # the custodian copied one digit wrong (a valid, odd-parity component)
        lines = files[corrupt - 1].read_text().splitlines()
        digits = bytearray(bytes.fromhex(lines[-1].replace(" ", "")))
        digits[0] ^= 0x03  # flips two bits of one byte: parity stays odd
        lines[-1] = digits.hex().upper()
        files[corrupt - 1].write_text("\n".join(lines) + "\n")
    # Scripted custodians: each confirms the KCV shown (y) after typing nothing: components from files.
    done = b.keys(
        "import-components",
        "--purpose",
        purpose,
        "--index",
        str(index),
        "--components",
        str(count),
        *[arg for f in files for arg in ("--component-file", str(f))],
        "--input-fd",
        "0",
        *b_options,
        stdin="y\n" * count,
    )
    seen = re.findall(r"component \d KCV: ([0-9A-F]{6})", done.stdout)
    assert len(seen) == count
    for number in range(count):  # every custodian at B sees the KCV A's custodian wrote down
        assert (seen[number] == component_kcvs[number]) is (corrupt != number + 1)
    return kcv_a, _kcv(done.stdout)


def so_pin_file(site: Site, folder: Path) -> Path:
    """A file holding the SO PIN of ``site``'s token (needed to mark a transport key trusted)."""
    path = folder / f"{site.token.label}.so-pin"
    if not path.exists():
        path.write_text(site.token.so_pin + "\n")
        path.chmod(0o600)
    return path


def transport_ceremony(a: Site, b: Site, index: int, folder: Path) -> str:
    """Give A and B the same trusted transport key ``index`` (2 components, the SO PIN at each); its KCV."""
    kcv_a, kcv_b = _ceremony(
        a,
        b,
        "transport",
        index,
        folder,
        a_options=("--so-pin-file", str(so_pin_file(a, folder))),
        b_options=("--so-pin-file", str(so_pin_file(b, folder))),
    )
    assert kcv_a == kcv_b
    return kcv_a


def _handshake(a: Site, b: Site, config: Config) -> ConnectionPair:
    server = Pkcs11KeyHolder(a.token.label, a.token.pin)
    client = Pkcs11KeyHolder(b.token.label, b.token.pin)
    pair = ConnectionPair(
        config,
        config,
        server_holder=server,
        client_holder=client,  # type: ignore[arg-type]
    )
    pair.server.initiate()
    pair.pump(raise_errors=False)
    pair.holders = (server, client)  # type: ignore[attr-defined]
    return pair


def _close(pair: ConnectionPair) -> None:
    for holder in pair.holders:  # type: ignore[attr-defined]
        holder.close()


def test_a_ceremony_between_two_hospitals_gives_a_working_link(
    sites: tuple[Site, Site], tmp_path: Path
) -> None:
    a, b = sites
    for purpose in ("auth", "enc"):
        kcv_a, kcv_b = _ceremony(a, b, purpose, 1, tmp_path)
        assert kcv_a == kcv_b
        # Each site checks the other's KCV (what they read to each other on the phone).
        assert "match" in a.keys("check", "--purpose", purpose, "--index", "1", "--kcv", kcv_b).stdout
        assert "match" in b.keys("check", "--purpose", purpose, "--index", "1", "--kcv", kcv_a).stdout

    pair = _handshake(a, b, Config(auth_key_id=1, enc_key_id=1))
    try:
        assert not pair.errors, pair.errors
        assert pair.server.state.name == pair.client.state.name
        exchange(pair, [b"CT image from hospital B" * 100], [b"report from hospital A"])
    finally:
        _close(pair)


def test_one_wrong_component_fails_with_the_authentication_error(
    sites: tuple[Site, Site], tmp_path: Path
) -> None:
    a, b = sites
    kcv_a, kcv_b = _ceremony(a, b, "auth", 2, tmp_path, count=3, corrupt=2)
    assert kcv_a != kcv_b
    done = b.keys("check", "--purpose", "auth", "--index", "2", "--kcv", kcv_a, check=False)
    assert done.returncode == 1 and "different keys" in done.stderr
    pair = _handshake(a, b, Config(auth_key_id=2, enc_key_id=1))
    try:
        codes = {role: error.code for role, error in pair.errors.items()}
        assert ErrorCode.AUTHENTICATION_FAILED in codes.values(), pair.errors
    finally:
        _close(pair)


def test_one_site_host_readable_the_other_not_still_gives_a_v100_link(
    sites: tuple[Site, Site], softhsm: SoftHsm, tmp_path: Path
) -> None:
    """A chose --host-readable (OpenSSL protects its records), B did not (its token does): the same key
    at both ends, so a V1.00 link with that key id works. A's value can be read with the user PIN, which
    is the price of host-readable; B's cannot."""
    a, b = sites
    kcv_a, kcv_b = _ceremony(a, b, "enc", 2, tmp_path, a_options=("--host-readable",))
    assert kcv_a == kcv_b
    kinds = {
        site.token.label: {
            (k["purpose"], k["index"]): k for k in json.loads(site.keys("list", "--json").stdout)["keys"]
        }
        for site in sites
    }
    assert kinds[a.token.label][("enc", 2)]["kind"] == "host-readable"
    assert kinds[b.token.label][("enc", 2)]["kind"] == "non-extractable"
    for value, site in ((True, a), (False, b)):
        assert kinds[site.token.label][("enc", 2)]["host_readable"] is value

    pair = _handshake(a, b, Config(profile=Profile.V100, auth_key_id=1, enc_key_id=2))
    try:
        assert not pair.errors, pair.errors
        server_holder, client_holder = pair.holders  # type: ignore[attr-defined]
        assert isinstance(server_holder.encryption_key(2), DesKey)
        assert isinstance(client_holder.encryption_key(2), TokenDesKey)
        exchange(pair, [b"CT image from hospital B" * 100], [b"report from hospital A"])
    finally:
        _close(pair)

    for site, readable in ((a, True), (b, False)):
        out = tmp_path / f"{site.token.label}-enc-2.bin"
        read = pkcs11_tool(
            softhsm, site.token.label, site.token.pin,
            "--read-object", "--type", "secrkey", "--label", "iscl-enc-2", "--output-file", str(out),
        )  # fmt: skip
        assert (read.returncode == 0) is readable, read.stderr
        if readable:
            read_kcv = kcv(out.read_bytes()).hex().upper()  # compared by KCV: the value is never shown
            assert read_kcv == kcv_a
        else:
            assert not out.exists() or out.stat().st_size == 0


def test_pkcs11_tool_lists_the_keys_and_reads_no_value(
    sites: tuple[Site, Site], softhsm: SoftHsm, tmp_path: Path
) -> None:
    """OpenSC, an independent client: documented labels and IDs, usages, and no readable CKA_VALUE
    (but for host-readable keys, which are not sensitive)."""
    a, _ = sites
    a.keys("generate", "--purpose", "auth", "--index", "5")
    a.keys("rotate", "--purpose", "auth", "--index", "5", "--grace", "7d")
    listing = json.loads(a.keys("list", "--json").stdout)
    seen = {
        (obj["label"], obj["ID"], obj["Usage"], "sensitive" in obj["Access"])
        for obj in secret_key_objects(softhsm, a.token.label, a.token.pin)
        if obj["label"] != MAC_KEY_LABEL  # the audit log's key (test_keys_audit_anchor.py)
    }
    usage = {
        "auth": "encrypt",
        "enc": "encrypt, decrypt, derive",
    }  # enc: derive (hardened), the key itself (V1.00)
    expected = {
        (
            k["label"],
            f"{ {'auth': 1, 'enc': 2}[k['purpose']]:02x}{k['index']:02x}{k['version']:02x}",
            usage[k["purpose"]],
            not k["host_readable"],
        )
        for k in listing["keys"]
    }
    assert expected <= seen, seen
    assert ("iscl-auth-5", "010502", "encrypt", True) in seen and (
        "iscl-auth-5",
        "010501",
        "encrypt",
        True,
    ) in seen
    for label in ("iscl-auth-1", "iscl-enc-1", "iscl-auth-5"):
        out = tmp_path / f"{label}.bin"
        read = pkcs11_tool(
            softhsm, a.token.label, a.token.pin, "--read-object", "--type", "secrkey", "--label", label,
            "--output-file", str(out),
        )  # fmt: skip
        assert read.returncode != 0, f"pkcs11-tool read the value of {label}"
        assert not out.exists() or out.stat().st_size == 0
    # The audit logs name every action and hold no PIN.
    for site in sites:
        text = site.audit_log.read_text()
        assert site.token.pin not in text and site.token.so_pin not in text
        assert "generate-components" in text or "import-components" in text
        assert (
            "chain intact"
            in subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "iscl_hsm",
                    "keys",
                    "audit",
                    "verify",
                    "--audit-log",
                    str(site.audit_log),
                ],
                env=site.env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
