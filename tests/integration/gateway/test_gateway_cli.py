"""`iscl tunnel client|server` as commands: a study through two tunnel processes, draining on SIGTERM,
the config file and its errors."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from iscl_hsm.cli.main import main
from iscl_hsm.dicom.study import StudySpec, write_study
from iscl_hsm.engine import Profile

from ..conftest import Hospitals
from .conftest import TIMEOUT, StoreScp, TunnelCommand, assert_stored_identical, dcmtk, parse_line, scu

LINK = re.compile(r"^(.* msg=link .*)$", re.MULTILINE)


def link_lines(output: str) -> list[dict[str, str]]:
    return [parse_line(match.group(1)) for match in LINK.finditer(output)]


def start_pair(
    tunnel_command: Callable[..., TunnelCommand], hospitals: Hospitals, storescp: StoreScp, profile: Profile
) -> tuple[TunnelCommand, TunnelCommand]:
    """A server tunnel in front of ``storescp`` and a client tunnel to it, both in ``profile``."""
    server = tunnel_command("server", hospitals.a, "--listen", "127.0.0.1:0", "--forward",
                            f"127.0.0.1:{storescp.port}", "--profile", profile.value)  # fmt: skip
    client = tunnel_command("client", hospitals.b, "--listen", "127.0.0.1:0", "--connect",
                            f"127.0.0.1:{server.port}", "--profile", profile.value)  # fmt: skip
    return server, client


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_a_study_through_two_tunnel_commands_and_sigterm_drains_the_open_link(
    tmp_path: Path, storescp: StoreScp, hospitals: Hospitals, tunnel_command: Callable[..., TunnelCommand],
    profile: Profile,
) -> None:
    server, client = start_pair(tunnel_command, hospitals, storescp, profile)
    files = write_study(tmp_path / "study", StudySpec(images=30, rows=512, columns=512))
    store = subprocess.Popen(
        [dcmtk("storescu"), "-v", "127.0.0.1", str(client.port), *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    wait_for(lambda: any(storescp.folder.iterdir()), "the first stored image")

    client.process.send_signal(signal.SIGTERM)  # while the association is open
    client.wait_output(r"stopping; waiting up to 30 s for 1 open link\(s\)")
    refused = scu("echoscu", client.port)  # the listener is closed at once
    store_output = store.communicate(timeout=TIMEOUT)[0]
    client_status, client_output = client.stop(None)
    server_status, server_output = server.stop()

    assert store.returncode == 0, store_output
    assert_stored_identical(storescp, files)
    assert refused.returncode != 0 and "Connection refused" in refused.stdout, refused.stdout
    assert client_status == 0 and "iscl tunnel client: stopped (0 link(s) aborted)" in client_output
    assert server_status == 0 and "iscl tunnel server: stopped (0 link(s) aborted)" in server_output
    (client_line,) = link_lines(client_output)
    (server_line,) = link_lines(server_output)
    assert client_line["result"] == server_line["result"] == "closed"
    assert client_line["up"] == server_line["down"] and int(client_line["up"]) > sum(f.stat().st_size for f in files)
    assert (client_line["auth_key"], client_line["algorithms"], client_line["enc_key"]) == ("1", "des-cbc+des-mac", "1")


def test_sigterm_aborts_links_still_open_after_the_drain_timeout(
    hospitals: Hospitals, tunnel_command: Callable[..., TunnelCommand]
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as application:  # a forward target that never answers
        server = tunnel_command("server", hospitals.a, "--listen", "127.0.0.1:0", "--forward",
                                f"127.0.0.1:{application.getsockname()[1]}")
        client = tunnel_command("client", hospitals.b, "--listen", "127.0.0.1:0", "--connect",
                                f"127.0.0.1:{server.port}", "--drain-timeout", "1")
        with socket.create_connection(("127.0.0.1", client.port), timeout=TIMEOUT) as app:
            app.sendall(bytes.fromhex("01000000"))  # the start of an A-ASSOCIATE-RQ, and then nothing
            application.settimeout(TIMEOUT)
            forwarded, _ = application.accept()  # the link is up end to end
            with forwarded:
                assert forwarded.recv(16) == bytes.fromhex("01000000")
                client.process.send_signal(signal.SIGTERM)
                with pytest.raises(ConnectionResetError):
                    app.recv(1 << 16)
                with pytest.raises(ConnectionResetError):  # the far application sees the abort too
                    forwarded.recv(16)
        status, output = client.stop(None)
        _, server_output = server.stop()

    assert status == 0
    assert "iscl tunnel client: stopped (1 link(s) aborted)" in output
    for text in (output, server_output):
        assert "Traceback" not in text and "never retrieved" not in text, text
    (line,) = link_lines(output)
    assert line["up"] == "4"
    assert line["result"] == (
        "aborted: the tunnel is stopping and the link did not end within the drain timeout of 1 s"
        " [ISCL 122 CONNECTION_LOST]"
    )


@pytest.mark.parametrize("profile", list(Profile), ids=lambda p: p.value)
def test_config_file_with_command_line_overrides(
    tmp_path: Path, storescp: StoreScp, hospitals: Hospitals, tunnel_command: Callable[..., TunnelCommand],
    profile: Profile,
) -> None:
    """The file chooses the profile and allows V1.00's plain MD5, which the command line's none + md5 needs
    (in hardened the MD5 is keyed anyway and the allowance changes nothing)."""
    config = tmp_path / "server.toml"
    config.write_text(
        f'forward = "127.0.0.1:{storescp.port}"\n'
        f'token = "{hospitals.a.label}"\n'
        f'pin-file = "{hospitals.pin_file(hospitals.a)}"\n'
        f'profile = "{profile.value}"\n'
        "allow-unkeyed-md5 = true\n"
        'encryption = "none"\n'
        'mac = "des-mac"\n'
        "allow-key-id = [1, 2]\n"
        "max-message = 262144\n"
    )
    server = tunnel_command("server", None, "--config", config, "--listen", "127.0.0.1:0", "--mac", "md5")
    client = tunnel_command("client", hospitals.b, "--listen", "127.0.0.1:0", "--connect",
                            f"127.0.0.1:{server.port}", "--profile", profile.value, "--allow-unkeyed-md5",
                            "--encryption", "none", "--mac", "md5", "--auth-key-id", "2")  # fmt: skip

    echo = scu("echoscu", client.port)
    server_status, server_output = server.stop()
    client.stop()

    assert echo.returncode == 0, echo.stdout
    assert server_status == 0
    (line,) = link_lines(server_output)
    assert (line["auth_key"], line["algorithms"], line["result"]) == ("2", "none+md5", "closed")


def test_v100_plain_md5_without_the_allowance_in_the_file_stops_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The file's encryption none + md5 in V1.00 without allow-unkeyed-md5: one line, before any token."""
    config = tmp_path / "tunnel.toml"
    config.write_text('forward = "127.0.0.1:104"\nencryption = "none"\nmac = "md5"\n')

    assert main(["tunnel", "server", "--config", str(config)]) == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        "iscl: V1.00 with encryption none and MD5 sends the MD5 unencrypted and unkeyed, which gives no"
        " protection against tampering"
    )


@pytest.mark.parametrize(("server_profile", "client_profile"), [
    (Profile.HARDENED, Profile.V100), (Profile.V100, Profile.HARDENED),
], ids=["hardened-server", "hardened-client"])  # fmt: skip
def test_tunnels_with_different_profiles_fail_the_link_and_name_the_profile(
    tmp_path: Path, storescp: StoreScp, hospitals: Hospitals, tunnel_command: Callable[..., TunnelCommand],
    server_profile: Profile, client_profile: Profile,
) -> None:
    """There is no negotiation: the first handshake message of the other profile's size fails the link,
    and the end that sees it, or sees the peer hang up, says the profile is the likely cause."""
    config = tmp_path / "server.toml"
    config.write_text(f'profile = "{server_profile.value}"\n')
    server = tunnel_command("server", hospitals.a, "--config", config, "--listen", "127.0.0.1:0", "--forward",
                            f"127.0.0.1:{storescp.port}")  # fmt: skip
    client = tunnel_command("client", hospitals.b, "--listen", "127.0.0.1:0", "--connect",
                            f"127.0.0.1:{server.port}", "--profile", client_profile.value)  # fmt: skip

    echo = scu("echoscu", client.port)
    server_status, server_output = server.stop()
    client_status, client_output = client.stop()

    assert echo.returncode != 0, echo.stdout
    assert server_status == client_status == 0  # a failed link stops neither tunnel
    for output, own in ((server_output, server_profile), (client_output, client_profile)):
        (line,) = link_lines(output)
        assert (line["auth_key"], line["algorithms"], line["enc_key"]) == ("-", "-", "-")
        assert line["result"].startswith("aborted: "), line["result"]
        assert (
            f"is the peer using the other profile? This end uses {own.value}, and both ends must choose the same"
            " profile (--profile)"
        ) in line["result"]
    assert "Association Acknowledged" not in storescp.output()  # nothing reached the application


CONFIG_ERRORS = [
    pytest.param('colour = "blue"\n', " has an unknown key 'colour'; the keys are the long options without '--':"
                 " listen, forward, chunk-size, drain-timeout,", id="unknown-key"),
    pytest.param("max-block = 7\n", ", key 'max-block': 7 is not a multiple of 8 between 8 and 8160", id="bad-value"),
    pytest.param('mac = "sha1"\n', ", key 'mac': 'sha1' is not one of none, md5, des-mac", id="bad-choice"),
    pytest.param("allow-key-id = [1, 9]\n", ", key 'allow-key-id': 9 is not a key index 1..8", id="bad-list-item"),
    pytest.param("idle-timeout = -1\n", ", key 'idle-timeout': -1 is not a number of seconds (0 or more)",
                 id="bad-idle-timeout"),
    pytest.param("listen = [1]\n", ", key 'listen': [1] is not a single string or number", id="bad-type"),
    pytest.param('profile = "v2"\n', ", key 'profile': 'v2' is not one of v1.00, hardened", id="bad-profile"),
    pytest.param('allow-unkeyed-md5 = "yes"\n', ", key 'allow-unkeyed-md5': 'yes' is not true or false",
                 id="bad-flag"),
    pytest.param('allow-from = ["10.0.0.5/8"]\n', ", key 'allow-from': '10.0.0.5/8' is not an address or a network"
                 " such as 10.0.0.0/8 (10.0.0.5/8 has host bits set)", id="bad-network"),
    pytest.param("proxy-protocol = 1\n", ", key 'proxy-protocol': 1 is not true or false", id="bad-proxy-protocol"),
    pytest.param("mac = \n", " is not valid TOML: Invalid value (at line 2, column 7)", id="not-toml"),
]


@pytest.mark.parametrize(("text", "error"), CONFIG_ERRORS)
def test_config_file_errors_name_the_file_and_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, error: str
) -> None:
    config = tmp_path / "tunnel.toml"
    config.write_text('forward = "127.0.0.1:104"\n' + text)

    with pytest.raises(SystemExit) as exit_info:
        main(["tunnel", "server", "--config", str(config)])

    assert exit_info.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"iscl tunnel server: error: the config file {config}{error}"), last


def test_missing_config_file_and_missing_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere.toml"
    for argv, error in [
        (["tunnel", "server", "--config", str(missing)],
         f"iscl tunnel server: error: cannot read the config file {missing}: No such file or directory"),
        (["tunnel", "client"],
         "iscl tunnel client: error: --connect HOST:PORT is required (or 'connect' in the --config file)"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == error
