"""`iscl keys` on real SoftHSM2 tokens: every command, and every bad input and fault of issue 3.

The commands run as subprocesses (``python3 -m iscl_hsm keys ...``), each a fresh process, against a
private SoftHSM2 token directory of this module; tokens are made with ``iscl keys init-token``
itself. Every failure must be one sentence on stderr and a non-zero exit status, and must leave the
token as it was.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from iscl_hsm.cli.ceremony import WIPE
from iscl_hsm.cli.status import EXIT_FAILURE, EXIT_UNAVAILABLE, EXIT_USAGE
from iscl_hsm.keyholder.provision import softhsm_environment
from iscl_hsm.keys.anchor import MAC_KEY_LABEL

from .conftest import SoftHsm, secret_key_objects
from .terminal import at_terminal

REPO = Path(__file__).resolve().parents[2]
MODULE = "/usr/lib/softhsm/libsofthsm2.so"

C1 = "0123 4567 89AB CDEF"  # odd parity, not weak
C2 = "9D0B BF51 C7E6 645D"
C3 = "1334 5779 9BBC DFF1"
BAD_PARITY = "0022446688AACCEE"  # every byte has even parity


@dataclass
class Token:
    label: str
    pin: str = field(repr=False)
    so_pin: str = field(repr=False)
    pin_file: Path
    so_pin_file: Path


@dataclass
class Hsm:
    """A private SoftHSM2 directory, its environment, and one audit log for the module."""

    folder: Path
    env: dict[str, str]
    audit_log: Path

    def run(
        self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None, audit: bool = True
    ) -> subprocess.CompletedProcess[str]:
        extra = ["--audit-log", str(self.audit_log)] if audit else []
        command = [sys.executable, "-m", "iscl_hsm", "keys", *args[:1], *extra, *args[1:]]
        return subprocess.run(
            command,
            env=env or self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def ok(self, *args: str, **kwargs: Any) -> str:
        done = self.run(*args, **kwargs)
        assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def fails(self, *args: str, match: str, status: int = EXIT_USAGE, **kwargs: Any) -> str:
        """The command fails with exit ``status`` (EXIT_USAGE: the command as typed cannot be carried out;
        EXIT_FAILURE: a check failed or was not confirmed; EXIT_UNAVAILABLE: a PIN, token or module that
        is not as the options say) and one sentence on stderr matching ``match``."""
        done = self.run(*args, **kwargs)
        assert done.returncode == status, f"{args} did not fail with {status}:\n{done.stdout}\n{done.stderr}"
        lines = [line for line in done.stderr.splitlines() if line.startswith("iscl")]  # the rest: prompts
        assert len(lines) == 1 and lines[0].startswith("iscl: ") and done.stderr.strip().endswith(lines[0]), (
            done.stderr
        )
        assert re.search(match, lines[0]), lines[0]
        assert "Traceback" not in done.stderr
        return lines[0]

    def token(self) -> Token:
        """A new token, made by ``iscl keys init-token`` from PIN files."""
        label = f"keys-{secrets.token_hex(4)}"
        pin, so_pin = secrets.token_hex(8), secrets.token_hex(8)
        pin_file, so_pin_file = self.folder / f"{label}.pin", self.folder / f"{label}.so-pin"
        pin_file.write_text(pin + "\n")
        so_pin_file.write_text(so_pin + "\n")
        out = self.ok(
            "init-token", "--label", label, "--so-pin-file", str(so_pin_file), "--pin-file", str(pin_file)
        )
        assert f"token '{label}' initialised, serial" in out
        return Token(label, pin, so_pin, pin_file, so_pin_file)

    def on(self, token: Token, *args: str) -> list[str]:
        """``action --token LABEL --pin-file FILE rest...`` as an argument list."""
        return [args[0], "--token", token.label, "--pin-file", str(token.pin_file), *args[1:]]

    def keys_of(self, token: Token) -> list[dict[str, Any]]:
        return list(json.loads(self.ok(*self.on(token, "list", "--json")))["keys"])


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hsm]:
    for tool, package in (("softhsm2-util", "softhsm2"), ("pkcs11-tool", "opensc")):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: apt-get install {package}")
    if not os.path.isfile(MODULE):
        pytest.fail(f"SoftHSM2 is not installed ({MODULE} missing): apt-get install softhsm2")
    folder = tmp_path_factory.mktemp("keys-cli")
    env = {
        **os.environ,
        **softhsm_environment(folder / "softhsm"),
        "PYTHONPATH": str(REPO),
        "ISCL_OFFICER": "Test Officer",
    }
    env.pop("ISCL_PIN", None)
    yield Hsm(folder, env, folder / "audit.log")


@pytest.fixture(scope="module")
def pair(hsm: Hsm) -> tuple[Token, Token]:
    """Two tokens that share transport key 1 (a 3-component ceremony with the SO PIN)."""
    c, d = hsm.token(), hsm.token()
    files = [str(hsm.folder / f"transport-{secrets.token_hex(3)}-{n}") for n in (1, 2, 3)]
    out = hsm.ok(
        *hsm.on(
            c,
            "generate-components",
            "--purpose",
            "transport",
            "--index",
            "1",
            "--components",
            "3",
            "--so-pin-file",
            str(c.so_pin_file),
            *[a for f in files for a in ("--component-file", f)],
        )
    )
    kcv = re.search(r"key KCV: (\w{6})", out)
    assert kcv and "aes256, non-extractable, trusted" in out
    out = hsm.ok(
        *hsm.on(
            d,
            "import-components",
            "--purpose",
            "transport",
            "--index",
            "1",
            "--components",
            "3",
            "--so-pin-file",
            str(d.so_pin_file),
            "--yes",
            *[a for f in files for a in ("--component-file", f)],
        )
    )
    assert f"key KCV: {kcv.group(1)}" in out and "trusted" in out
    return c, d


@pytest.fixture(scope="module")
def component_token(hsm: Hsm) -> Token:
    return hsm.token()


def _kcv(out: str) -> str:
    match = re.search(r"KCV ([0-9A-F]{6})\s*$", out.strip().splitlines()[-1])
    assert match, out
    return match.group(1)


def _components_in(
    hsm: Hsm,
    token: Token,
    purpose: str,
    index: int,
    *components: str,
    extra: tuple[str, ...] = (),
    answers: str | None = None,
) -> list[str]:
    """import-components arguments with the components typed twice and confirmed on --input-fd 0."""
    args = hsm.on(
        token,
        "import-components",
        "--purpose",
        purpose,
        "--index",
        str(index),
        "--components",
        str(len(components)),
        "--input-fd",
        "0",
        *extra,
    )
    return args


def _typed(*components: str, confirm: str = "y") -> str:
    """What the custodians type: each component twice, then the KCV confirmation, then Enter."""
    return "".join(f"{c}\n{c}\n{confirm}\n\n" for c in components)


def _mistyped(component: str) -> str:
    """A custodian typing a component the command refuses (twice), at each of the 3 attempts."""
    return f"{component}\n{component}\n" * 3


# --- init-token ------------------------------------------------------------------------------------


def test_init_token_refuses_an_existing_label_and_replaces_it_with_the_so_pin(hsm: Hsm) -> None:
    token = hsm.token()
    hsm.ok(*hsm.on(token, "generate", "--purpose", "auth", "--index", "1"))
    hsm.fails(
        "init-token",
        "--label",
        token.label,
        "--so-pin-file",
        str(token.so_pin_file),
        "--pin-file",
        str(token.pin_file),
        match="already exists",
    )
    assert len(hsm.keys_of(token)) == 1
    wrong = hsm.folder / "wrong-so"
    wrong.write_text("wrong-so-pin\n")
    message = hsm.fails(
        "init-token",
        "--label",
        token.label,
        "--replace",
        "--so-pin-file",
        str(wrong),
        "--pin-file",
        str(token.pin_file),
        match="wrong SO PIN",
        status=EXIT_UNAVAILABLE,
    )
    assert "wrong-so-pin" not in message
    assert len(hsm.keys_of(token)) == 1
    hsm.ok(
        "init-token",
        "--label",
        token.label,
        "--replace",
        "--so-pin-file",
        str(token.so_pin_file),
        "--pin-file",
        str(token.pin_file),
    )
    assert hsm.keys_of(token) == []


def test_init_token_prompts_each_pin_twice(hsm: Hsm) -> None:
    label = f"typed-{secrets.token_hex(3)}"
    hsm.fails(
        "init-token", "--label", label, "--input-fd", "0", stdin="so-pin-1\nso-pin-2\n", match="differ",
        status=EXIT_FAILURE,
    )  # fmt: skip
    hsm.fails("init-token", "--label", label, match="stdin is not a terminal", stdin="")
    hsm.ok(
        "init-token", "--label", label, "--input-fd", "0", stdin="so-pin-1\nso-pin-1\nuser-pin\nuser-pin\n"
    )
    pin = hsm.folder / f"{label}.pin"
    pin.write_text("user-pin\n")
    hsm.ok("list", "--token", label, "--pin-file", str(pin))


# --- generate, list, check, delete -----------------------------------------------------------------


def test_generate_list_check_and_delete(hsm: Hsm) -> None:
    token = hsm.token()
    kcv1 = _kcv(hsm.ok(*hsm.on(token, "generate", "--purpose", "auth", "--index", "1")))
    out = hsm.ok(*hsm.on(token, "generate", "--purpose", "enc", "--index", "2", "--algorithm", "des3"))
    assert "des3, non-extractable" in out
    keys = hsm.keys_of(token)
    assert [
        (k["purpose"], k["index"], k["version"], k["algorithm"], k["extractable"], k["current"]) for k in keys
    ] == [("auth", 1, 1, "des", False, True), ("enc", 2, 1, "des3", False, True)]
    assert keys[0]["kcv"] == kcv1 and keys[0]["created"].endswith("Z")
    table = hsm.ok(*hsm.on(token, "list"))
    assert re.search(rf"auth\s+1\s+1\s+des\s+{kcv1}\s+\S+Z\s+non-extractable\s+current", table)

    assert "match" in hsm.ok(
        *hsm.on(token, "check", "--purpose", "auth", "--index", "1", "--kcv", kcv1.lower())
    )
    hsm.fails(
        *hsm.on(token, "check", "--purpose", "auth", "--index", "1", "--kcv", "000000"),
        match="different keys.*KCV_MISMATCH",
        status=EXIT_FAILURE,
    )
    hsm.fails(
        *hsm.on(token, "check", "--purpose", "auth", "--index", "1", "--kcv", "XYZ"), match="not hexadecimal"
    )
    hsm.fails(
        *hsm.on(token, "check", "--purpose", "auth", "--index", "4", "--kcv", kcv1),
        match="not on token",
        status=EXIT_FAILURE,
    )

    hsm.fails(
        *hsm.on(token, "generate", "--purpose", "auth", "--index", "1"), match="index in use.*--replace"
    )
    kcv2 = _kcv(hsm.ok(*hsm.on(token, "generate", "--purpose", "auth", "--index", "1", "--replace")))
    assert [(k["version"], k["kcv"]) for k in hsm.keys_of(token) if k["purpose"] == "auth"] == [(2, kcv2)]

    hsm.fails(
        *hsm.on(token, "delete", "--purpose", "auth", "--index", "1"), match="stdin is not a terminal.*--yes"
    )
    hsm.fails(
        *hsm.on(token, "delete", "--purpose", "auth", "--index", "1", "--input-fd", "0"),
        stdin="n\n",
        match="not confirmed.*NOT_CONFIRMED",
        status=EXIT_FAILURE,
    )
    hsm.fails(
        *hsm.on(token, "delete", "--purpose", "auth", "--index", "1", "--version", "7", "--yes"),
        match="version 7 is not on token",
        status=EXIT_FAILURE,
    )
    out = hsm.ok(
        *hsm.on(token, "delete", "--purpose", "auth", "--index", "1", "--input-fd", "0"), stdin="y\n"
    )
    assert f"deleted iscl-auth-1 version 2 (KCV {kcv2})" in out
    assert [k["purpose"] for k in hsm.keys_of(token)] == ["enc"]


def test_algorithms_are_checked_against_the_purpose(hsm: Hsm) -> None:
    token = hsm.token()
    hsm.fails(
        *hsm.on(token, "generate", "--purpose", "auth", "--index", "1", "--algorithm", "aes128"),
        match="cannot be aes128.*DES",
    )
    hsm.fails(
        *hsm.on(token, "generate", "--purpose", "auth", "--index", "1", "--algorithm", "rc4"),
        match="unknown algorithm",
    )
    hsm.fails(
        *hsm.on(token, "generate", "--purpose", "transport", "--index", "1"), match="same on both tokens"
    )
    assert hsm.keys_of(token) == []


# --- host-readable encryption keys (V1.00 on the host) ---------------------------------------------


def _tool(hsm: Hsm) -> SoftHsm:
    """This module's SoftHSM2 directory as conftest's SoftHsm, for the pkcs11-tool helpers."""
    return SoftHsm(data_dir=hsm.folder / "softhsm", env=hsm.env, pool=[])


def _audit_entries(hsm: Hsm, token: Token) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, hsm.audit_log.read_text().splitlines()) if e["token"] == token.label]


def _component_files(hsm: Hsm, name: str, count: int = 2) -> list[str]:
    """--component-file arguments for ``count`` new files."""
    stem = f"{name}-{secrets.token_hex(3)}"
    return [a for n in range(1, count + 1) for a in ("--component-file", str(hsm.folder / f"{stem}-{n}"))]


def test_every_way_of_creating_an_enc_key_gives_it_v100_capabilities_and_the_kind_asked_for(hsm: Hsm) -> None:
    token = hsm.token()
    readable = "host-readable (V1.00 on the host)"
    assert "des, non-extractable, KCV" in hsm.ok(
        *hsm.on(token, "generate", "--purpose", "enc", "--index", "1")
    )
    out = hsm.ok(*hsm.on(token, "generate", "--purpose", "enc", "--index", "2", "--host-readable"))
    assert f"stored iscl-enc-2 version 1 on token '{token.label}': des, {readable}, KCV" in out
    out = hsm.ok(
        *_components_in(hsm, token, "enc", 3, C1, C2, extra=("--host-readable",)), stdin=_typed(C1, C2)
    )
    assert f"des, {readable}, KCV" in out
    out = hsm.ok(
        *hsm.on(token, "generate-components", "--purpose", "enc", "--index", "4", "--components", "2",
                "--host-readable", *_component_files(hsm, "enc-4"))
    )  # fmt: skip
    assert f"des, {readable}, KCV" in out
    # Rotation chooses the new version's kind; a change is pointed out.
    out = hsm.ok(
        *hsm.on(token, "rotate", "--purpose", "enc", "--index", "1", "--grace", "1d", "--host-readable")
    )
    assert f"note: iscl-enc-1 version 1 was non-extractable; iscl-enc-1 version 2 is {readable}" in out
    out = hsm.ok(*hsm.on(token, "rotate", "--purpose", "enc", "--index", "2", "--grace", "1d"))
    assert (
        f"note: iscl-enc-2 version 1 was {readable}; iscl-enc-2 version 2 is non-extractable (pass"
        " --host-readable to keep V1.00 links on the host)"
    ) in out

    kinds = [
        (k["index"], k["version"], k["kind"], k["host_readable"], k["extractable"])
        for k in hsm.keys_of(token)
    ]
    assert kinds == [
        (1, 1, "non-extractable", False, False),
        (1, 2, "host-readable", True, True),
        (2, 1, "host-readable", True, True),
        (2, 2, "non-extractable", False, False),
        (3, 1, "host-readable", True, True),
        (4, 1, "host-readable", True, True),
    ]
    table = hsm.ok(*hsm.on(token, "list"))
    assert re.search(r"enc\s+1\s+2\s+des\s+\w{6}\s+\S+Z\s+host-readable\s+current", table), table
    assert re.search(r"enc\s+2\s+2\s+des\s+\w{6}\s+\S+Z\s+non-extractable\s+current", table), table
    assert f"{readable}: V1.00 links read it once per process" in table and "user PIN can read it" in table
    assert "exportable (trusted wrap only):" not in table  # the legend explains the kinds present only

    # OpenSC sees ENCRYPT, DECRYPT and DERIVE on every key but the audit log's MAC key, and CKA_SENSITIVE
    # only where asked.
    objects = [o for o in secret_key_objects(_tool(hsm), token.label, token.pin) if o["label"] != MAC_KEY_LABEL]
    assert len(objects) == 6
    for obj in objects:
        assert obj["Usage"] == "encrypt, decrypt, derive", obj
        host_readable = (int(obj["ID"][2:4], 16), int(obj["ID"][4:6], 16)) in {(1, 2), (2, 1), (3, 1), (4, 1)}
        assert ("sensitive" in obj["Access"]) is not host_readable, obj
    # The audit log records each key's kind.
    created = [e for e in _audit_entries(hsm, token) if e["action"] not in ("init-token", "list")]
    assert [
        (e["action"], e["index"], e["version"], re.findall(r"\bkind ([\w-]+)", e["detail"])) for e in created
    ] == [
        ("generate", 1, 1, ["non-extractable"]),
        ("generate", 2, 1, ["host-readable"]),
        ("import-components", 3, 1, ["host-readable"]),
        ("generate-components", 4, 1, ["host-readable"]),
        ("rotate", 1, 2, ["host-readable"]),
        ("rotate", 2, 2, ["non-extractable"]),
    ]


def test_host_readable_is_refused_for_auth_and_transport_keys_and_with_exportable(hsm: Hsm) -> None:
    token = hsm.token()
    only_enc = "only encryption keys can be made host-readable"
    hsm.fails(
        *hsm.on(token, "generate", "--purpose", "auth", "--index", "1", "--host-readable"), match=only_enc
    )
    hsm.fails(
        *hsm.on(token, "generate", "--purpose", "enc", "--index", "1", "--host-readable", "--exportable"),
        match=r"either exportable \(wrapped\) or host-readable, not both",
    )
    hsm.ok(*hsm.on(token, "generate", "--purpose", "auth", "--index", "2"))
    hsm.fails(
        *hsm.on(token, "rotate", "--purpose", "auth", "--index", "2", "--grace", "0", "--host-readable"),
        match=only_enc,
    )
    # Refused before anyone types or is shown a component, and before the SO PIN is asked for.
    hsm.fails(
        *_components_in(hsm, token, "auth", 3, C1, C2, extra=("--host-readable",)), stdin="", match=only_enc
    )
    files = _component_files(hsm, "transport", 3)
    hsm.fails(
        *hsm.on(token, "generate-components", "--purpose", "transport", "--index", "1", "--components", "3",
                "--host-readable", *files),
        match=only_enc,
    )  # fmt: skip
    assert not any(Path(f).exists() for f in files[1::2])
    assert [(k["purpose"], k["index"], k["version"]) for k in hsm.keys_of(token)] == [("auth", 2, 1)]
    refused = [e["result"] for e in _audit_entries(hsm, token) if e["result"] != "ok"]
    assert len(refused) == 5 and all(r.startswith("failed: ") for r in refused), refused


def test_import_wrapped_can_make_a_key_host_readable_and_a_host_readable_key_is_not_exported(
    hsm: Hsm, pair: tuple[Token, Token], tmp_path: Path
) -> None:
    c, d = pair
    kcv = _kcv(hsm.ok(*hsm.on(c, "generate", "--purpose", "enc", "--index", "2", "--exportable")))
    wrapped = tmp_path / "enc-2.json"
    hsm.ok(
        *hsm.on(c, "export", "--purpose", "enc", "--index", "2", "--wrap-with", "1", "--out", str(wrapped))
    )
    into_d = ("import-wrapped", str(wrapped), "--token", d.label, "--pin-file", str(d.pin_file))
    hsm.fails(*into_d, "--host-readable", "--exportable", match="either exportable .* or host-readable")
    out = hsm.ok(*into_d, "--host-readable")
    stored = f"imported iscl-enc-2 version 1 on token '{d.label}': des, host-readable (V1.00 on the host)"
    assert f"{stored}, KCV {kcv}" in out
    entry = _audit_entries(hsm, d)[-1]
    assert entry["action"] == "import-wrapped" and entry["detail"].endswith("; kind host-readable")
    (imported,) = [o for o in secret_key_objects(_tool(hsm), d.label, d.pin) if o["label"] == "iscl-enc-2"]
    assert imported["Usage"] == "encrypt, decrypt, derive" and "sensitive" not in imported["Access"], imported
    hsm.fails(
        *hsm.on(d, "export", "--purpose", "enc", "--index", "2", "--wrap-with", "1"),
        match="is host-readable .* not exportable; give the other site the same key by a component ceremony",
    )
    # An authentication key never becomes host-readable, however it arrives.
    hsm.ok(*hsm.on(c, "generate", "--purpose", "auth", "--index", "2", "--exportable"))
    auth = tmp_path / "auth-2.json"
    hsm.ok(*hsm.on(c, "export", "--purpose", "auth", "--index", "2", "--wrap-with", "1", "--out", str(auth)))
    hsm.fails(
        "import-wrapped", str(auth), "--token", d.label, "--pin-file", str(d.pin_file), "--host-readable",
        match="only encryption keys can be made host-readable",
    )  # fmt: skip
    assert not [k for k in hsm.keys_of(d) if (k["purpose"], k["index"]) == ("auth", 2)]


def _encryption_key_as_v100_sees_it(hsm: Hsm, token: Token, index: int) -> str:
    """What Pkcs11KeyHolder.encryption_key(index) gives in a fresh process: a class name or an error code."""
    code = (
        "import sys\n"
        "from iscl_hsm.errors import KeyHolderError\n"
        "from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder\n"
        "label, pin_file, index = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
        "with Pkcs11KeyHolder(label, open(pin_file).read().strip()) as holder:\n"
        "    try:\n"
        "        print(type(holder.encryption_key(index)).__name__)\n"
        "    except KeyHolderError as error:\n"
        "        print(error.code.name)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, token.label, str(token.pin_file), str(index)],
        env=hsm.env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_pre_v100_enc_key_is_made_again_for_v100_from_the_same_components(hsm: Hsm) -> None:
    """docs/security-officer.md: rotating to the same components keeps the key's value (the peer site
    need not change anything) and gives it the capabilities V1.00 needs."""
    from iscl_hsm.keys.components import ALGORITHMS, combine, parse_component

    token = hsm.token()
    value = combine(
        ALGORITHMS["des"], [parse_component(c, ALGORITHMS["des"], n)[0] for n, c in ((1, C1), (2, C2))]
    )
    code = (
        "import sys\n"
        "from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder\n"
        "from tests.integration.conftest import pre_v100_enc_key\n"
        "with Pkcs11KeyHolder(sys.argv[1], open(sys.argv[2]).read().strip()) as holder:\n"
        "    with holder.session() as session:\n"
        "        session.create_object(pre_v100_enc_key(1, bytes.fromhex(sys.stdin.read())))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, token.label, str(token.pin_file)],
        input=value.hex(), env=hsm.env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (old,) = hsm.keys_of(token)
    assert _encryption_key_as_v100_sees_it(hsm, token, 1) == "KEY_NOT_FOUND"

    files = [hsm.folder / f"pre-v100-{secrets.token_hex(3)}-{n}" for n in (1, 2)]
    for path, component in zip(files, (C1, C2), strict=True):
        path.write_text(component + "\n")
    out = hsm.ok(
        *hsm.on(token, "rotate", "--purpose", "enc", "--index", "1", "--grace", "1d", "--import-components",
                "2", "--host-readable", "--yes", *[a for f in files for a in ("--component-file", str(f))])
    )  # fmt: skip
    assert f"key KCV: {old['kcv']}" in out and "version 2" in out
    assert [(k["version"], k["kcv"], k["kind"], k["current"]) for k in hsm.keys_of(token)] == [
        (1, old["kcv"], "non-extractable", False),
        (2, old["kcv"], "host-readable", True),
    ]
    assert _encryption_key_as_v100_sees_it(hsm, token, 1) == "DesKey"
    assert "retired iscl-enc-1 version 1" in hsm.ok(*hsm.on(token, "retire", "--now", "--yes"))


# --- bad input and faults --------------------------------------------------------------------------


def test_bad_purpose_index_pin_token_module_and_officer(hsm: Hsm, tmp_path: Path) -> None:
    token = hsm.token()
    hsm.fails(
        *hsm.on(token, "generate", "--purpose", "mac", "--index", "1"), match="unknown key purpose 'mac'"
    )
    hsm.fails(
        *hsm.on(token, "generate", "--purpose", "auth", "--index", "9"), match="index 9 is outside 1..8"
    )
    hsm.fails(
        *hsm.on(token, "generate", "--purpose", "auth", "--index", "0"), match="index 0 is outside 1..8"
    )
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("not-the-pin\n")
    wrong_pin = ("list", "--token", token.label, "--pin-file", str(wrong))
    first = hsm.fails(*wrong_pin, match=f"wrong PIN for .*'{token.label}'", status=EXIT_UNAVAILABLE)
    assert "not-the-pin" not in first and "tries" in first
    second = hsm.fails(*wrong_pin, match="wrong PIN", status=EXIT_UNAVAILABLE)
    assert "few tries are left" in second  # SoftHSM2 sets CKF_USER_PIN_COUNT_LOW after a failure
    hsm.fails(
        "list", "--token", "no-such-token", "--pin-file", str(wrong), match="'no-such-token' not found",
        status=EXIT_UNAVAILABLE,
    )
    hsm.fails(
        "list", "--token", token.label[:-1], "--pin-file", str(token.pin_file), match="not found",
        status=EXIT_UNAVAILABLE,
    )  # no prefix match
    hsm.fails(
        *hsm.on(token, "list", "--pkcs11-module", "/nonexistent/libpkcs11.so"),
        match="/nonexistent/libpkcs11.so could not be loaded: no such file",
        status=EXIT_UNAVAILABLE,
    )
    env = {k: v for k, v in hsm.env.items() if k != "ISCL_OFFICER"}
    hsm.fails(
        *hsm.on(token, "generate", "--purpose", "auth", "--index", "1"), env=env, match="--officer NAME"
    )
    hsm.ok(
        *hsm.on(token, "generate", "--purpose", "auth", "--index", "1", "--officer", "Named Officer"), env=env
    )
    log = hsm.audit_log.read_text()
    assert "refused: 'iscl keys generate' changes the token" in log and '"officer":"Named Officer"' in log
    assert token.pin not in log and "not-the-pin" not in log


def test_a_locked_pin_and_the_last_try_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """SoftHSM2 never locks a PIN, so this one fakes the module's answers (the messages are ours)."""
    import pkcs11

    from iscl_hsm.errors import KeyHolderError
    from iscl_hsm.keyholder import pkcs11 as holder_module

    class FakeToken:
        def __init__(self, flags: int, error: type[Exception]) -> None:
            self.flags, self.error = flags, error

        def open(self, **kwargs: Any) -> None:
            raise self.error()

    class FakeLib:
        def __init__(self, token: FakeToken) -> None:
            self.token = token

        def get_token(self, token_label: str) -> FakeToken:
            return self.token

    for flags, error, expected in (
        (pkcs11.TokenFlag.USER_PIN_LOCKED, pkcs11.exceptions.PinLocked, "is locked; the security officer"),
        (pkcs11.TokenFlag.USER_PIN_FINAL_TRY, pkcs11.exceptions.PinIncorrect, "one try left"),
        (pkcs11.TokenFlag.USER_PIN_LOCKED, pkcs11.exceptions.PinIncorrect, "now locked"),
    ):
        fake = FakeLib(FakeToken(flags, error))
        monkeypatch.setattr(holder_module, "_load_module", lambda module, fake=fake: fake)
        with pytest.raises(KeyHolderError, match=expected) as caught:
            holder_module.Pkcs11KeyHolder("fake-token", "secret-pin-123", record_keys="token")
        assert "secret-pin-123" not in str(caught.value)


# --- components ------------------------------------------------------------------------------------


def test_import_components_typed_twice_and_confirmed(hsm: Hsm) -> None:
    token = hsm.token()
    out = hsm.ok(*_components_in(hsm, token, "auth", 1, C1, C2), stdin=_typed(C1, C2))
    assert "component 1 KCV: D5D44F" in out  # FIPS 81 key 0123456789ABCDEF
    key_kcv = re.search(r"key KCV: (\w{6})", out)
    assert key_kcv and f"KCV {key_kcv.group(1)}" in out.splitlines()[-1]
    assert C1.replace(" ", "") not in out and C1 not in out
    # Three components.
    out = hsm.ok(*_components_in(hsm, token, "enc", 1, C1, C2, C3), stdin=_typed(C1, C2, C3))
    assert out.count("KCV:") == 4
    keys = hsm.keys_of(token)
    assert [(k["purpose"], k["index"], k["extractable"]) for k in keys] == [
        ("auth", 1, False),
        ("enc", 1, False),
    ]
    log = hsm.audit_log.read_text()
    for component in (C1, C2, C3):
        assert component.replace(" ", "") not in log and component.replace(" ", "").lower() not in log


UNCONFIRMED = ("two entries of component 1 differ", "custodian 1 did not confirm")
"""Refusals that are not usage errors: the custodian did not confirm (exit 1, 132 NOT_CONFIRMED)."""


@pytest.mark.parametrize(
    ("components", "typed", "extra", "match"),
    [
        pytest.param(
            (C1, C2),
            f"{C1}\n{C2}\n" * 3,
            (),
            UNCONFIRMED[0] + "; nothing was stored after 3 attempts",
            id="typed-twice-differently",
        ),
        pytest.param((C1, C2), f"{C1}\n{C1}\nn\n" * 3, (), UNCONFIRMED[1], id="kcv-not-confirmed"),
        pytest.param(
            ("01234567 89ABCDEZ", C2),
            _mistyped("01234567 89ABCDEZ"),
            (),
            "component 1 is not hexadecimal",
            id="malformed-hex",
        ),
        pytest.param(
            (C1, "0123"),
            _typed(C1) + _mistyped("0123"),
            (),
            "component 2 has 4 hex digits; a des component has 16",
            id="wrong-length",
        ),
        pytest.param(
            (C1, "FEFEFEFEFEFEFEFE"),
            _typed(C1) + _mistyped("FEFEFEFEFEFEFEFE"),
            (),
            "component 2 is a weak",
            id="weak-component",
        ),
        pytest.param(
            (C1, "01FE01FE01FE01FE"),
            _typed(C1) + _mistyped("01FE01FE01FE01FE"),
            (),
            "component 2 is a weak or semi-weak",
            id="semi-weak-component",
        ),
        pytest.param((C1, C1), _typed(C1, C1), (), "combined key is a weak", id="weak-combined-key"),
        pytest.param(
            (BAD_PARITY, C2),
            _mistyped(BAD_PARITY),
            (),
            r"wrong DES parity in byte 1, 2, 3, 4, 5, 6, 7, 8.*--fix-parity",
            id="bad-parity-refused",
        ),
        pytest.param((C1, C2, C3, C1), "", (), "2 or 3 components, not 4", id="four-components"),
        pytest.param((C1, C2), "", ("--input-fd", "9"), "cannot read --input-fd 9", id="bad-fd"),
        pytest.param(
            (C1 + C1 + C1, C2 + C2 + C2),
            _typed(C1 + C1 + C1, C2 + C2 + C2),
            ("--algorithm", "des3"),
            "two equal adjacent 8-byte parts",
            id="degenerate-triple-des",
        ),
    ],
)
def test_bad_components_are_refused_and_nothing_is_stored(
    hsm: Hsm,
    component_token: Token,
    components: tuple[str, ...],
    typed: str,
    extra: tuple[str, ...],
    match: str,
) -> None:
    token = component_token
    args = _components_in(hsm, token, "auth", 3, *components, extra=extra)  # a later --input-fd wins
    status = EXIT_FAILURE if match.startswith(UNCONFIRMED) else EXIT_USAGE
    message = hsm.fails(*args, stdin=typed, match=match, status=status)
    for component in components:
        assert component.replace(" ", "") not in message
    assert hsm.keys_of(token) == []


def test_bad_parity_is_fixed_when_asked_and_said(hsm: Hsm) -> None:
    token = hsm.token()
    out = hsm.ok(
        *_components_in(hsm, token, "auth", 1, BAD_PARITY, C2, extra=("--fix-parity",)),
        stdin=_typed(BAD_PARITY, C2),
    )
    assert "component 1: DES parity fixed in byte 1, 2, 3, 4, 5, 6, 7, 8" in out


def test_components_need_a_terminal_or_a_scripted_source(hsm: Hsm) -> None:
    token = hsm.token()
    args = hsm.on(token, "import-components", "--purpose", "auth", "--index", "1", "--components", "2")
    hsm.fails(*args, stdin="", match="stdin is not a terminal.*--input-fd")
    out_args = hsm.on(token, "generate-components", "--purpose", "auth", "--index", "1", "--components", "2")
    hsm.fails(*out_args, match="components are shown only on a terminal.*--component-file")
    hsm.fails(
        *out_args,
        "--component-file",
        str(hsm.folder / "only-one"),
        match="once per component: 2 times, not 1",
    )
    assert hsm.keys_of(token) == []


def test_generate_components_refuses_an_index_in_use_before_showing_anything(hsm: Hsm) -> None:
    token = hsm.token()
    hsm.ok(*hsm.on(token, "generate", "--purpose", "enc", "--index", "4"))
    files = [hsm.folder / f"unused-{secrets.token_hex(3)}-{n}" for n in (1, 2)]
    hsm.fails(
        *hsm.on(
            token,
            "generate-components",
            "--purpose",
            "enc",
            "--index",
            "4",
            "--components",
            "2",
            *[a for f in files for a in ("--component-file", str(f))],
        ),
        match="index in use",
    )
    assert not any(f.exists() for f in files)


# --- transport keys, export and import --------------------------------------------------------------


def test_a_transport_key_needs_the_right_so_pin(hsm: Hsm, tmp_path: Path) -> None:
    token = hsm.token()
    wrong = tmp_path / "so"
    wrong.write_text("wrong-so-pin\n")
    args = _components_in(hsm, token, "transport", 2, C1 * 4, C2 * 4, extra=("--so-pin-file", str(wrong)))
    message = hsm.fails(
        *args,
        stdin=_typed((C1 * 4).replace(" ", ""), (C2 * 4).replace(" ", "")),
        match="wrong SO PIN",
        status=EXIT_UNAVAILABLE,
    )
    assert "wrong-so-pin" not in message
    assert hsm.keys_of(token) == []
    # The SO PIN is checked before the custodians start: nothing is shown with a wrong one.
    files = [str(tmp_path / f"never-{n}") for n in (1, 2)]
    done = hsm.run(
        *hsm.on(
            token,
            "generate-components",
            "--purpose",
            "transport",
            "--index",
            "2",
            "--components",
            "2",
            "--so-pin-file",
            str(wrong),
            *[a for f in files for a in ("--component-file", f)],
        )
    )
    assert done.returncode == EXIT_UNAVAILABLE and "wrong SO PIN" in done.stderr and "component" not in done.stdout
    assert not any(Path(f).exists() for f in files)


def test_export_and_import_under_a_transport_key(hsm: Hsm, pair: tuple[Token, Token], tmp_path: Path) -> None:
    c, d = pair
    kcv = _kcv(hsm.ok(*hsm.on(c, "generate", "--purpose", "auth", "--index", "6", "--exportable")))
    assert [k["extractable"] for k in hsm.keys_of(c) if k["index"] == 6] == [True]
    wrapped = tmp_path / "auth-6.json"
    hsm.ok(
        *hsm.on(
            c,
            "export",
            "--purpose",
            "auth",
            "--index",
            "6",
            "--wrap-with",
            "iscl-transport-1",
            "--out",
            str(wrapped),
        )
    )
    document = json.loads(wrapped.read_text())
    assert (
        document["purpose"],
        document["index"],
        document["version"],
        document["algorithm"],
        document["kcv"],
    ) == ("auth", 6, 1, "des", kcv)
    assert wrapped.stat().st_mode & 0o777 == 0o600
    out = hsm.ok("import-wrapped", str(wrapped), "--token", d.label, "--pin-file", str(d.pin_file))
    assert f"imported iscl-auth-6 version 1 on token '{d.label}': des, non-extractable, KCV {kcv}" in out
    assert "match" in hsm.ok(*hsm.on(d, "check", "--purpose", "auth", "--index", "6", "--kcv", kcv))
    hsm.fails(
        "import-wrapped",
        str(wrapped),
        "--token",
        d.label,
        "--pin-file",
        str(d.pin_file),
        match="index in use",
    )
    # An enc key in three-key triple DES, exported to stdout.
    kcv = _kcv(
        hsm.ok(
            *hsm.on(c, "generate", "--purpose", "enc", "--index", "6", "--exportable", "--algorithm", "des3")
        )
    )
    text = hsm.ok(*hsm.on(c, "export", "--purpose", "enc", "--index", "6", "--wrap-with", "1"))
    (tmp_path / "enc-6.json").write_text(text)
    assert f"KCV {kcv}" in hsm.ok(
        "import-wrapped", str(tmp_path / "enc-6.json"), "--token", d.label, "--pin-file", str(d.pin_file)
    )


def test_a_non_exportable_key_is_not_exported(hsm: Hsm, pair: tuple[Token, Token]) -> None:
    c, _ = pair
    hsm.ok(*hsm.on(c, "generate", "--purpose", "auth", "--index", "7"))
    hsm.fails(
        *hsm.on(c, "export", "--purpose", "auth", "--index", "7", "--wrap-with", "iscl-transport-1"),
        match="created non-exportable",
    )
    hsm.ok(*hsm.on(c, "generate", "--purpose", "enc", "--index", "7", "--exportable"))
    hsm.fails(
        *hsm.on(c, "export", "--purpose", "enc", "--index", "7", "--wrap-with", "iscl-transport-2"),
        match="iscl-transport-2 is not on token",
        status=EXIT_FAILURE,
    )
    hsm.fails(
        *hsm.on(c, "export", "--purpose", "auth", "--index", "7", "--wrap-with", "aes"),
        match="not a transport key",
    )


def test_corrupted_files_and_a_wrong_transport_key(
    hsm: Hsm, pair: tuple[Token, Token], tmp_path: Path
) -> None:
    c, d = pair
    hsm.ok(*hsm.on(c, "generate", "--purpose", "enc", "--index", "8", "--exportable"))
    good = json.loads(hsm.ok(*hsm.on(c, "export", "--purpose", "enc", "--index", "8", "--wrap-with", "1")))
    cases: dict[str, tuple[str, str]] = {}
    cases["not-json"] = ("{ this is not json", "corrupted \\(it is not JSON\\)")
    damaged = dict(good, wrapped=good["wrapped"][:-2] + ("00" if good["wrapped"][-2:] != "00" else "11"))
    cases["wrapped-bytes"] = (json.dumps(damaged), "altered after export: its fields do not match the MAC")
    cases["kcv"] = (json.dumps(dict(good, kcv="ABCDEF")), "altered after export: its fields do not match")
    cases["missing-field"] = (
        json.dumps({k: v for k, v in good.items() if k != "index"}),
        "a field is missing",
    )
    cases["other-format"] = (json.dumps({"format": "something else"}), "is not a wrapped-key file")
    for name, (text, match) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        status = EXIT_USAGE if name == "other-format" else EXIT_FAILURE  # a wrong file named, or a bad one
        hsm.fails(
            "import-wrapped", str(path), "--token", d.label, "--pin-file", str(d.pin_file), match=match,
            status=status,
        )  # fmt: skip
    hsm.fails(
        "import-wrapped",
        str(tmp_path / "absent.json"),
        "--token",
        d.label,
        "--pin-file",
        str(d.pin_file),
        match="cannot read the wrapped-key file",
    )
    assert not [k for k in hsm.keys_of(d) if k["purpose"] == "enc" and k["index"] == 8]
    # A third token whose transport key 1 is another key.
    e = hsm.token()
    args = _components_in(hsm, e, "transport", 1, C1 * 4, C3 * 4, extra=("--so-pin-file", str(e.so_pin_file)))
    hsm.ok(*args, stdin=_typed((C1 * 4).replace(" ", ""), (C3 * 4).replace(" ", "")))
    path = tmp_path / "good.json"
    path.write_text(json.dumps(good))
    hsm.fails(
        "import-wrapped",
        str(path),
        "--token",
        e.label,
        "--pin-file",
        str(e.pin_file),
        match="wrong transport key: the file was wrapped under a transport key with KCV",
        status=EXIT_FAILURE,
    )
    assert [k["purpose"] for k in hsm.keys_of(e)] == ["transport"]
    hsm.ok(
        "import-wrapped", str(path), "--token", d.label, "--pin-file", str(d.pin_file)
    )  # the good file still works


# --- rotation ---------------------------------------------------------------------------------------


def test_rotation_with_a_grace_period_then_retire(hsm: Hsm, pair: tuple[Token, Token]) -> None:
    c, _ = pair
    first = _kcv(hsm.ok(*hsm.on(c, "generate", "--purpose", "auth", "--index", "3")))
    hsm.fails(
        *hsm.on(c, "rotate", "--purpose", "auth", "--index", "4", "--grace", "7d"),
        match="nothing to rotate",
        status=EXIT_FAILURE,
    )
    hsm.fails(
        *hsm.on(c, "rotate", "--purpose", "auth", "--index", "3", "--grace", "soon"), match="not a duration"
    )
    out = hsm.ok(*hsm.on(c, "rotate", "--purpose", "auth", "--index", "3", "--grace", "7d"))
    second = _kcv(out.splitlines()[0])
    assert "version 2" in out and second != first
    keys = [k for k in hsm.keys_of(c) if (k["purpose"], k["index"]) == ("auth", 3)]
    assert [(k["version"], k["current"], k["kcv"]) for k in keys] == [(1, False, first), (2, True, second)]
    assert keys[0]["retire_after"] and keys[1]["retire_after"] is None
    hsm.fails(
        *hsm.on(c, "check", "--purpose", "auth", "--index", "3", "--kcv", first),
        match="no longer current.*KCV_MISMATCH",
        status=EXIT_FAILURE,
    )
    assert "no previous key version is due" in hsm.ok(*hsm.on(c, "retire"))
    # Roll back: deleting the new version makes the previous one current again.
    hsm.ok(*hsm.on(c, "delete", "--purpose", "auth", "--index", "3", "--version", "2", "--yes"))
    assert "match" in hsm.ok(*hsm.on(c, "check", "--purpose", "auth", "--index", "3", "--kcv", first))
    # Rotate again with a short grace period: retire removes the old version once it has passed.
    third = _kcv(
        hsm.ok(*hsm.on(c, "rotate", "--purpose", "auth", "--index", "3", "--grace", "1s")).splitlines()[0]
    )
    time.sleep(1.5)
    assert f"retired iscl-auth-3 version 1 (KCV {first})" in hsm.ok(
        *hsm.on(c, "retire", "--purpose", "auth", "--index", "3")
    )
    assert [
        (k["version"], k["kcv"]) for k in hsm.keys_of(c) if (k["purpose"], k["index"]) == ("auth", 3)
    ] == [(2, third)]
    # retire --now ignores the grace period.
    hsm.ok(*hsm.on(c, "rotate", "--purpose", "auth", "--index", "3", "--grace", "30d"))
    assert "retired iscl-auth-3 version 2" in hsm.ok(*hsm.on(c, "retire", "--now", "--yes"))


def test_rotation_by_components_at_both_sites(hsm: Hsm, pair: tuple[Token, Token]) -> None:
    c, d = pair
    out_c = hsm.ok(
        *hsm.on(
            c,
            "generate-components",
            "--purpose",
            "enc",
            "--index",
            "5",
            "--components",
            "2",
            *[a for n in (1, 2) for a in ("--component-file", str(hsm.folder / f"enc5-v1-{n}"))],
        )
    )
    hsm.ok(
        *hsm.on(
            d,
            "import-components",
            "--purpose",
            "enc",
            "--index",
            "5",
            "--components",
            "2",
            "--yes",
            *[a for n in (1, 2) for a in ("--component-file", str(hsm.folder / f"enc5-v1-{n}"))],
        )
    )
    files = [str(hsm.folder / f"enc5-v2-{n}") for n in (1, 2)]
    out = hsm.ok(
        *hsm.on(
            c,
            "rotate",
            "--purpose",
            "enc",
            "--index",
            "5",
            "--grace",
            "2d",
            "--generate-components",
            "2",
            *[a for f in files for a in ("--component-file", f)],
        )
    )
    new = re.search(r"key KCV: (\w{6})", out)
    assert new and new.group(1) not in out_c
    out = hsm.ok(
        *hsm.on(
            d,
            "rotate",
            "--purpose",
            "enc",
            "--index",
            "5",
            "--grace",
            "2d",
            "--import-components",
            "2",
            "--yes",
            *[a for f in files for a in ("--component-file", f)],
        )
    )
    assert f"key KCV: {new.group(1)}" in out and "version 2" in out
    for token in (c, d):
        keys = [k for k in hsm.keys_of(token) if (k["purpose"], k["index"]) == ("enc", 5)]
        assert [(k["version"], k["current"]) for k in keys] == [(1, False), (2, True)]


# --- the audit log from the command line --------------------------------------------------------------


def test_every_action_is_in_the_audit_log_and_tampering_is_caught(hsm: Hsm, tmp_path: Path) -> None:
    token = hsm.token()
    log = tmp_path / "audit.log"
    env = dict(hsm.env)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "iscl_hsm", "keys", *args, "--audit-log", str(log)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    assert run(*hsm.on(token, "generate", "--purpose", "auth", "--index", "1")).returncode == 0
    assert run(*hsm.on(token, "list")).returncode == 0
    assert run(*hsm.on(token, "generate", "--purpose", "auth", "--index", "1")).returncode == 2  # in use
    assert run(*hsm.on(token, "delete", "--purpose", "auth", "--index", "1", "--yes")).returncode == 0
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["action"], e["result"][:6]) for e in entries] == [
        ("generate", "ok"),
        ("list", "ok"),
        ("generate", "failed"),
        ("delete", "ok"),
    ]
    first = entries[0]
    assert first["officer"] == "Test Officer" and first["token"] == token.label and len(first["serial"]) == 16
    assert (first["purpose"], first["index"], first["version"]) == ("auth", 1, 1) and len(first["kcv"]) == 6
    assert "index in use" in entries[2]["result"]
    verified = run("audit", "verify")
    assert verified.returncode == 0 and "4 entries, chain intact" in verified.stdout
    head = verified.stdout.split("head ")[1].strip()
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2] + lines[3:]) + "\n")  # one line removed
    done = run("audit", "verify")
    assert done.returncode == 1 and "line 3" in done.stderr and "removed" in done.stderr
    log.write_text("\n".join(lines[:3]) + "\n")  # the last line cut off: only the recorded head shows it
    assert run("audit", "verify").returncode == 0
    done = run("audit", "verify", "--head", head)
    assert done.returncode == 1 and "does not contain the recorded head" in done.stderr


# --- at a terminal -----------------------------------------------------------------------------------


def _at_terminal(hsm: Hsm, args: list[str], dialogue: list[tuple[str, str]]) -> tuple[int, str]:
    """Run ``iscl keys ARGS`` on a pseudo-terminal; for each (prompt, answer) wait for it, then type."""
    argv = [sys.executable, "-m", "iscl_hsm", "keys", args[0], "--audit-log", str(hsm.audit_log), *args[1:]]
    return at_terminal(argv, hsm.env, dialogue)


def test_a_ceremony_at_the_terminal(hsm: Hsm) -> None:
    """Screens cleared between custodians, components typed twice without echo, KCVs confirmed."""
    a, b = hsm.token(), hsm.token()
    status, screen = _at_terminal(
        hsm,
        hsm.on(a, "generate-components", "--purpose", "auth", "--index", "1", "--components", "2"),
        [
            ("to show component 1.", ""),
            ("then press Enter.", ""),
            ("to show component 2.", ""),
            ("then press Enter.", ""),
        ],
    )
    assert status == 0, screen
    components = re.findall(r"component (\d) of 2:  ((?:[0-9A-F]{4} ?){4})", screen)
    assert [n for n, _ in components] == ["1", "2"]
    assert screen.count(WIPE) >= 4  # the screen and its scrollback are wiped before and after each custodian
    key_kcv = re.search(r"key KCV: (\w{6})", screen)
    assert key_kcv
    typed = [c.strip() for _, c in components]
    status, screen = _at_terminal(
        hsm,
        hsm.on(b, "import-components", "--purpose", "auth", "--index", "1", "--components", "2"),
        [
            ("component 1 (hidden): ", typed[0]),
            ("component 1 again: ", typed[0]),
            ("[y/N] ", "y"),
            ("custodian 2 is ready.", ""),
            ("component 2 (hidden): ", typed[1]),
            ("component 2 again: ", typed[1]),
            ("[y/N] ", "y"),
        ],
    )
    assert status == 0, screen
    assert f"key KCV: {key_kcv.group(1)}" in screen
    for component in typed:
        assert component not in screen and component.replace(" ", "") not in screen  # never echoed
