"""The systemd units in systemd/, and what the tunnel does for them (docs/systemd.md).

``systemd-analyze`` checks each unit as an instance (@demo): ``verify`` finds nothing to say and
``security --offline=true`` scores it 3.0 or lower with nothing EXPOSED. The units reach the package's
``iscl`` at /opt/iscl/bin/iscl, which this machine need not have, so they are checked with this
interpreter's ``-m iscl_hsm`` in its place. The documented set-up (``iscl keys init-token
--softhsm-dir``) then serves a real ``iscl tunnel server``, which tells a stand-in for systemd on a
datagram socket when it is ready and when it stops; a wrong PIN exits with EXIT_CONFIG, which the
units never restart.
"""

from __future__ import annotations

import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from iscl_hsm.cli.main import EXIT_CONFIG
from iscl_hsm.cli.status import EXIT_UNAVAILABLE
from iscl_hsm.shared import doc_reference

from .background import TIMEOUT, Background
from .test_cli import child_env

REPO = Path(__file__).resolve().parents[2]
UNITS = sorted((REPO / "systemd").glob("iscl-tunnel-*@.service"))
ROLES = {"iscl-tunnel-server@.service": "server", "iscl-tunnel-client@.service": "client"}
SHIPPED_ISCL = "/opt/iscl/bin/iscl"
MAX_EXPOSURE = 3.0


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    if not Path(path).is_file():
        pytest.fail("systemd-analyze is not installed: apt-get install systemd")
    return path


def instance(unit: Path, folder: Path) -> Path:
    """``unit`` copied into ``folder`` with this interpreter as its iscl; the path of its @demo instance."""
    text = unit.read_text()
    assert f"ExecStart={SHIPPED_ISCL} " in text
    (folder / unit.name).write_text(text.replace(SHIPPED_ISCL, f"{sys.executable} -m iscl_hsm"))
    return folder / unit.name.replace("@.service", "@demo.service")


def settings(unit: Path) -> dict[str, list[str]]:
    """Each ``Key=value`` of the unit file: key -> the values in order."""
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", "[")):
            found.setdefault(key, []).append(value)
    return found


def analyze(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze(), *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def test_both_tunnel_roles_are_shipped_and_differ_only_in_their_role() -> None:
    assert {unit.name for unit in UNITS} == set(ROLES)

    def role_free(unit: Path) -> list[str]:
        role = ROLES[unit.name]
        lines = [line for line in unit.read_text().splitlines() if not line.startswith(("#", "Description="))]
        return [line.replace(f"tunnel {role}", "tunnel ROLE") for line in lines]

    server, client = (REPO / "systemd" / name for name in ROLES)
    assert role_free(server) == role_free(client)


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_systemd_analyze_verify_is_clean(unit: Path, tmp_path: Path) -> None:
    done = analyze("verify", "--man=no", instance(unit, tmp_path))
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_systemd_analyze_security_scores_it_hardened(unit: Path, tmp_path: Path) -> None:
    done = analyze("security", "--offline=true", "--no-pager", instance(unit, tmp_path))
    assert done.returncode == 0, done.stderr
    overall = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\S+)", done.stdout)
    assert overall is not None, done.stdout
    assert float(overall.group(1)) <= MAX_EXPOSURE, done.stdout
    assert "EXPOSED" not in done.stdout


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_what_a_restart_cannot_mend_is_never_restarted(unit: Path) -> None:
    found = settings(unit)
    assert found["Restart"] == ["on-failure"]
    assert str(EXIT_CONFIG) in found["RestartPreventExitStatus"][0].split()
    assert found["Type"] == ["notify"] and found["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert found["StateDirectory"] == ["iscl/%i"]
    assert found["Environment"] == ["SOFTHSM2_CONF=%S/iscl/%i/softhsm2.conf"]


# --- the documented set-up, and the tunnel under a Type=notify manager ----------------------------


@dataclass(frozen=True)
class Site:
    """A token made as docs/systemd.md says: in its own state directory, by `iscl keys init-token`."""

    state: Path
    label: str
    pin_file: Path

    def env(self, **extra: str) -> dict[str, str]:
        """What the unit gives the service: SOFTHSM2_CONF in the state directory."""
        return {**child_env(), "SOFTHSM2_CONF": str(self.state / "softhsm2.conf"), **extra}


def keys(*args: object, env: dict[str, str], audit_log: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "iscl_hsm", "keys", *map(str, args), "--officer", "Test Officer"]
    return subprocess.run(
        [*command, "--audit-log", str(audit_log)],
        env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    folder = tmp_path_factory.mktemp("site")
    state = folder / "var" / "lib" / "iscl" / "demo"
    pin_file, so_pin_file = folder / "demo.pin", folder / "demo.so-pin"
    pin_file.write_text(secrets.token_hex(8) + "\n")
    so_pin_file.write_text(secrets.token_hex(8) + "\n")
    label = f"site-{secrets.token_hex(4)}"
    made = keys(
        "init-token", "--label", label, "--softhsm-dir", state, "--pin-file", pin_file, "--so-pin-file",
        so_pin_file, env=child_env(), audit_log=folder / "audit.log",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert f"SOFTHSM2_CONF={state / 'softhsm2.conf'}" in made.stdout
    made_site = Site(state, label, pin_file)
    generated = keys(
        "generate", "--token", label, "--pin-file", pin_file, "--purpose", "auth", "--index", "1",
        env=made_site.env(), audit_log=folder / "audit.log",
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    return made_site


def test_init_token_writes_the_softhsm_configuration_into_the_state_directory(site: Site) -> None:
    conf = (site.state / "softhsm2.conf").read_text()
    assert f"directories.tokendir = {site.state / 'tokens'}\n" in conf
    assert any((site.state / "tokens").iterdir())  # the token lives there, not in a default place
    assert site.state.stat().st_mode & 0o077 == 0


def test_init_token_names_a_state_directory_it_cannot_make(tmp_path: Path) -> None:
    (tmp_path / "iscl").write_text("a file where the directory should be\n")
    pin_file = tmp_path / "pin"
    pin_file.write_text("1234-5678\n")
    done = keys(
        "init-token", "--label", "nowhere", "--softhsm-dir", tmp_path / "iscl" / "demo", "--pin-file", pin_file,
        "--so-pin-file", pin_file, env=child_env(), audit_log=tmp_path / "audit.log",
    )  # fmt: skip
    assert done.returncode == EXIT_UNAVAILABLE  # `iscl keys` statuses; the tunnel's stay 78
    assert done.stderr == (
        f"iscl: cannot write the SoftHSM2 configuration in {tmp_path / 'iscl' / 'demo'}: Not a directory; run as"
        f" the service's user, on a directory it owns ({doc_reference('systemd.md')}) [ISCL 102 LOCAL_KEY_HOLDER]\n"
    )


class NotifySocket:
    """A stand-in for systemd: the datagram socket $NOTIFY_SOCKET names."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(TIMEOUT)  # a safety net against a hang, never an assertion

    def next(self) -> dict[str, str]:
        """The next notification's assignments."""
        return dict(line.split("=", 1) for line in self.sock.recv(4096).decode().splitlines())

    def empty(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        return False


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[NotifySocket]:
    notify = NotifySocket(tmp_path / "notify")
    yield notify
    notify.sock.close()


def tunnel_server(site: Site, manager: NotifySocket, pin_file: Path) -> Background:
    return Background(
        [sys.executable, "-m", "iscl_hsm", "tunnel", "server", "--listen", "127.0.0.1:0", "--forward",
         "127.0.0.1:9", "--token", site.label, "--pin-file", pin_file],
        site.env(NOTIFY_SOCKET=str(manager.path)),
    )  # fmt: skip


def test_ready_once_the_port_accepts_and_stopping_on_sigterm(site: Site, manager: NotifySocket) -> None:
    tunnel = tunnel_server(site, manager, site.pin_file)
    try:
        ready = manager.next()
        assert ready["READY"] == "1"
        listening = re.fullmatch(
            r"listening on 127\.0\.0\.1:(\d+), links go to 127\.0\.0\.1:9", ready["STATUS"]
        )
        assert listening is not None, ready
        with socket.create_connection(("127.0.0.1", int(listening.group(1))), timeout=TIMEOUT):
            pass  # accepted as soon as READY=1 arrived
        tunnel.proc.send_signal(signal.SIGTERM)
        stopping = manager.next()
        assert stopping["STOPPING"] == "1"
        assert re.fullmatch(r"stopping; waiting up to 30 s for (\d+ open link\(s\)|the open links of \d+ workers)",
                            stopping["STATUS"]), (
            stopping
        )
        assert tunnel.finish() == 0, tunnel.lines
    finally:
        tunnel.proc.kill()


def test_a_wrong_pin_exits_with_the_status_the_units_never_restart(
    site: Site, manager: NotifySocket, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("not-the-pin\n")
    tunnel = tunnel_server(site, manager, wrong)
    assert tunnel.finish() == EXIT_CONFIG
    assert len(tunnel.lines) == 1 and f"wrong PIN for PKCS#11 token '{site.label}'" in tunnel.lines[0]
    assert manager.empty()  # never READY=1: systemd reports the failed start
