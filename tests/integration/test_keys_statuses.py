"""`iscl keys` exit statuses, the token it requires, and init-token's --softhsm-conf.

Statuses (docs/security-officer.md, section 7): 0 done; 1 a check failed or a confirmation was
refused; 2 the command as typed cannot be carried out; 3 the token cannot be used. The tunnel and
link commands keep 78 for the same token faults (tests/integration/test_cli.py). A keys command never
picks a token by itself: without --token or ISCL_TOKEN it stops, and no demo token appears.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from iscl_hsm.cli.status import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE

from .conftest import SoftHsm
from .test_keys_ceremony import REPO, Site

NO_TOKEN = (
    "iscl: name the token: pass --token LABEL or set ISCL_TOKEN (`iscl keys init-token --label LABEL` makes"
)


@pytest.fixture(scope="module")
def site(softhsm: SoftHsm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("statuses")
    env = {
        **softhsm.tool_env(),
        "PYTHONPATH": str(REPO),
        "ISCL_OFFICER": "Status Test",
        "XDG_DATA_HOME": str(folder / "data"),  # where a demo token would appear
    }
    env.pop("ISCL_PIN", None)
    env.pop("ISCL_TOKEN", None)
    token = softhsm.take()
    pin_file = folder / "pin"
    pin_file.write_text(token.pin + "\n")
    made = Site(token, pin_file, folder / "audit.log", env)
    made.keys("generate", "--purpose", "auth", "--index", "1")
    made.keys("generate", "--purpose", "enc", "--index", "1")
    made.keys("rotate", "--purpose", "enc", "--index", "1", "--grace", "30d")
    yield made


def iscl(*args: object, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iscl_hsm", *map(str, args)],
        env=env, input=stdin, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _one_sentence(done: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("iscl")]
    assert len(lines) == 1 and lines[0].startswith("iscl: ") and "Traceback" not in done.stderr, done.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args",
    [
        ("list",),
        ("generate", "--purpose", "auth", "--index", "2"),
        ("check", "--purpose", "auth", "--index", "1", "--kcv", "000000"),
        ("rotate", "--purpose", "auth", "--index", "1", "--grace", "1d"),
        ("retire",),
        ("delete", "--purpose", "auth", "--index", "1", "--yes"),
        ("export", "--purpose", "auth", "--index", "1", "--wrap-with", "1"),
    ],
    ids=lambda args: args[0],
)
def test_every_keys_command_needs_a_token_and_never_makes_the_demo_token(
    site: Site, tmp_path: Path, args: tuple[str, ...]
) -> None:
    done = iscl("keys", *args, "--audit-log", tmp_path / "audit.log", env=site.env)
    assert done.returncode == EXIT_USAGE, done.stderr
    assert _one_sentence(done).startswith(NO_TOKEN)
    assert not (Path(site.env["XDG_DATA_HOME"]) / "iscl-hsm" / "tokens").exists()  # no demo token
    assert [k["purpose"] for k in json.loads(site.keys("list", "--json").stdout)["keys"]] == [
        "auth", "enc", "enc",
    ]  # fmt: skip


def test_iscl_token_names_the_token(site: Site, tmp_path: Path) -> None:
    env = {**site.env, "ISCL_TOKEN": site.token.label}
    done = iscl("keys", "list", "--pin-file", site.pin_file, "--audit-log", tmp_path / "a.log", env=env)
    assert done.returncode == EXIT_OK and f"token '{site.token.label}'" in done.stdout, done.stderr


def test_keys_exit_statuses(site: Site, tmp_path: Path) -> None:
    """One command per status and cause; each says one sentence and, but for 0, changes nothing."""
    wrong_pin = tmp_path / "wrong.pin"
    wrong_pin.write_text("not-the-pin\n")
    kcv = json.loads(site.keys("list", "--json").stdout)["keys"][0]["kcv"]
    env_no_officer = {k: v for k, v in site.env.items() if k != "ISCL_OFFICER"}
    cases: list[tuple[int, tuple[str, ...], str, dict[str, str] | None]] = [
        (EXIT_OK, ("check", "--purpose", "auth", "--index", "1", "--kcv", kcv), "", None),
        (EXIT_FAILURE, ("check", "--purpose", "auth", "--index", "1", "--kcv", "000000"),
         r"different keys \[ISCL 129 KCV_MISMATCH\]", None),
        (EXIT_FAILURE, ("delete", "--purpose", "auth", "--index", "1", "--input-fd", "0"),
         r"not confirmed; nothing was destroyed \[ISCL 132 NOT_CONFIRMED\]", None),
        (EXIT_FAILURE, ("delete", "--purpose", "auth", "--index", "3", "--yes"), "KEY_NOT_FOUND", None),
        (EXIT_USAGE, ("generate", "--purpose", "auth", "--index", "9"), r"outside 1\.\.8 \[ISCL 100", None),
        (EXIT_USAGE, ("generate", "--purpose", "mac", "--index", "2"), "unknown key purpose 'mac'", None),
        (EXIT_USAGE, ("rotate", "--purpose", "auth", "--index", "1", "--grace", "soon"), "not a duration", None),
        (EXIT_USAGE, ("generate", "--purpose", "auth", "--index", "2"), "--officer NAME", env_no_officer),
        (EXIT_USAGE, ("generate", "--purpose", "auth", "--index", "1"), "index in use", None),
        (EXIT_USAGE, ("generate", "--index", "2"), "the following arguments are required: --purpose", None),
        (EXIT_UNAVAILABLE, ("list", "--token", "no-such-token"), "'no-such-token' not found", None),
        (EXIT_UNAVAILABLE, ("list", "--pin-file", str(wrong_pin)), "wrong PIN", None),
        (EXIT_UNAVAILABLE, ("list", "--pkcs11-module", "/nonexistent/lib.so"), "could not be loaded", None),
    ]  # fmt: skip
    for status, args, match, env in cases:
        done = site.keys(*args, check=False, stdin="n\n") if env is None else iscl(
            "keys", args[0], "--token", site.token.label, "--pin-file", site.pin_file,
            "--audit-log", site.audit_log, *args[1:], env=env,
        )  # fmt: skip
        assert done.returncode == status, (args, done.returncode, done.stderr)
        if status != EXIT_OK:
            sentence = _one_sentence(done) if not match.startswith("the following") else done.stderr
            assert re.search(match, sentence), (args, sentence)
    assert len(json.loads(site.keys("list", "--json").stdout)["keys"]) == 3  # nothing changed


def test_retire_now_asks_first_and_a_refusal_keeps_the_previous_version(site: Site) -> None:
    done = site.keys("retire", "--now", "--input-fd", "0", stdin="n\n", check=False)
    assert done.returncode == EXIT_FAILURE and "NOT_CONFIRMED" in done.stderr, done.stderr
    assert (
        "Destroy iscl-enc-1 version 1 (KCV" in done.stderr and "whatever their grace periods" in done.stderr
    )
    assert len(json.loads(site.keys("list", "--json").stdout)["keys"]) == 3
    refused = site.keys("retire", "--now", check=False)  # no terminal, no answer
    assert refused.returncode == EXIT_USAGE and "--yes" in refused.stderr
    assert (
        "no previous key version is due" in site.keys("retire", "--input-fd", "0", stdin="").stdout
    )  # no question
    done = site.keys("retire", "--now", "--input-fd", "0", stdin="y\n")
    assert "retired iscl-enc-1 version 1" in done.stdout
    assert [k["version"] for k in json.loads(site.keys("list", "--json").stdout)["keys"]] == [1, 2]


def test_audit_verify_reports_tampering_with_status_1_and_its_own_code(site: Site, tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    log.write_text(site.audit_log.read_text())
    assert iscl("keys", "audit", "verify", "--audit-log", log, env=site.env).returncode == EXIT_OK
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0].replace("Status Test", "Someone Else"), *lines[1:]]) + "\n")
    done = iscl("keys", "audit", "verify", "--audit-log", log, env=site.env)
    assert done.returncode == EXIT_FAILURE
    assert _one_sentence(done).endswith("[ISCL 130 AUDIT_LOG]")


def test_init_token_softhsm_conf_creates_or_uses_the_configuration(site: Site, tmp_path: Path) -> None:
    conf = tmp_path / "site" / "hsm.conf"
    (tmp_path / "site").mkdir(mode=0o700)
    pin = tmp_path / "user.pin"
    pin.write_text("user-pin-1234\n")
    so_pin = tmp_path / "so.pin"
    so_pin.write_text("so-pin-5678\n")
    env = {k: v for k, v in site.env.items() if k != "SOFTHSM2_CONF"}
    made = iscl("keys", "init-token", "--label", "conf-a", "--softhsm-conf", conf, "--pin-file", pin,
                "--so-pin-file", so_pin, "--audit-log", tmp_path / "a.log", env=env)  # fmt: skip
    assert made.returncode == EXIT_OK, made.stderr
    assert f"the other commands need SOFTHSM2_CONF={conf}" in made.stdout
    assert f"directories.tokendir = {tmp_path / 'site' / 'tokens'}\n" in conf.read_text()
    assert any((tmp_path / "site" / "tokens").iterdir())
    # An existing configuration is used as it is (here with a line of the site's own).
    conf.write_text(conf.read_text() + "# kept by the site\n")
    again = iscl("keys", "init-token", "--label", "conf-b", "--softhsm-conf", conf, "--pin-file", pin,
                 "--so-pin-file", so_pin, "--audit-log", tmp_path / "a.log", env=env)  # fmt: skip
    assert again.returncode == EXIT_OK, again.stderr
    assert conf.read_text().endswith("# kept by the site\n")
    listed = iscl("keys", "list", "--token", "conf-b", "--pin-file", pin, "--audit-log", tmp_path / "a.log",
                  env={**env, "SOFTHSM2_CONF": str(conf)})  # fmt: skip
    assert listed.returncode == EXIT_OK and "token 'conf-b'" in listed.stdout, listed.stderr
    both = iscl("keys", "init-token", "--label", "conf-c", "--softhsm-conf", conf, "--softhsm-dir", tmp_path,
                "--pin-file", pin, "--so-pin-file", so_pin, env=env)  # fmt: skip
    assert both.returncode == EXIT_USAGE and "not allowed with argument" in both.stderr
