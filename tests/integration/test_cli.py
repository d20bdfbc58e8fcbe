"""The `iscl` command, run as `python3 -m iscl_hsm` in child processes against SoftHSM2 tokens.

The children see the test session's tokens through SOFTHSM2_CONF (conftest.py); `iscl demo` gets its
own data directory through XDG_DATA_HOME. Servers listen on port 0 and the test reads the port from
their "listening on HOST:PORT" line.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from iscl_hsm import __version__
from iscl_hsm.cli.main import EXIT_CONFIG
from iscl_hsm.engine import Profile
from iscl_hsm.wire import MessageId
from tests.helpers import V100_PAYLOAD_SIZES

from .background import TIMEOUT, Background
from .conftest import HOSPITAL_KEYS, Hospitals, SoftHsmToken, TamperingProxy

REPO = Path(__file__).resolve().parents[2]
"""Seconds a child may run: a safety net against hangs, never an assertion."""

LINK_LINE = {
    Profile.V100: "ISCL link up: MEDIS-ISCL V1.00, v1.00 profile, block 8160 bytes, auth key 1, des-cbc + des-mac"
    " with key 1, no peer auth data",
    Profile.HARDENED: "ISCL link up: MEDIS-ISCL V1.00, hardened profile, block 8160 bytes, auth key 1, des-cbc +"
    " des-mac with key 1, peer auth data 'iscl-hsm'",
}
"""What each end prints on stderr once the link is up, with the default settings of each profile."""
CLOSE_NOTE = "closed by the peer (unauthenticated in V1.00"


def without_close_note(profile: Profile, server_lines: list[str], client_lines: list[str]) -> tuple[list[str], list[str]]:
    """Both ends' stderr lines without the V1.00 close note, which the end the peer closed prints
    (one end at most; none if both asked at once), and never in the hardened profile."""
    notes = [line for line in server_lines + client_lines if CLOSE_NOTE in line]
    assert len(notes) <= (1 if profile is Profile.V100 else 0), notes
    return [x for x in server_lines if CLOSE_NOTE not in x], [x for x in client_lines if CLOSE_NOTE not in x]


KEY_HOLDER_OPTIONS = ["--pkcs11-module", "--token", "--pin-file", "--record-keys"]
LINK_OPTIONS = [
    "--auth-key-id", "--enc-key-id", "--encryption", "--mac", "--max-block", "--max-message", "--auth-data",
]  # fmt: skip


def child_env(hospitals: Hospitals | None = None, **extra: str) -> dict[str, str]:
    """This process's environment without SoftHSM2/PIN settings, plus PYTHONPATH and ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("SOFTHSM2_CONF", "OPENSSL_CONF", "ISCL_PIN", "XDG_DATA_HOME", "PYTHONPATH")
    }
    env["PYTHONPATH"] = str(REPO)
    if hospitals is not None:
        env["SOFTHSM2_CONF"] = hospitals.softhsm_conf
    env.update(extra)
    return env


def iscl(
    *args: object, env: dict[str, str], stdin: object = subprocess.DEVNULL, stdout: object = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    """Run ``iscl args``; stderr (and stdout unless redirected) is captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "iscl_hsm", *map(str, args)],
        env=env, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip


def token_args(hospitals: Hospitals, token: SoftHsmToken) -> list[str]:
    return ["--token", token.label, "--pin-file", str(hospitals.pin_file(token))]


def one_line(stderr: str) -> str:
    """The single line a failing command prints (no traceback, no logging)."""
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("iscl: "), lines[0]
    return lines[0]


class Server(Background):
    """`iscl server --listen 127.0.0.1:0 ...` in the background; stderr collected line by line."""

    def __init__(self, args: Sequence[object], env: dict[str, str], stdin: Path | None, stdout: Path) -> None:
        with open(stdin or os.devnull, "rb") as source, open(stdout, "wb") as sink:
            super().__init__(
                [sys.executable, "-m", "iscl_hsm", "server", "--listen", "127.0.0.1:0", *args], env,
                stdin=source, stdout=sink,
            )  # fmt: skip

    @property
    def port(self) -> int:
        return int(self.wait_for(r"^iscl server: listening on 127\.0\.0\.1:(\d+)$").group(1))


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Servers a test starts are appended here and killed afterwards if still running."""
    started: list[Server] = []
    yield started
    for server in started:
        server.kill()


def start_server(
    servers: list[Server], args: Sequence[object], env: dict[str, str], stdin: Path | None, stdout: Path
) -> Server:
    server = Server(args, env, stdin, stdout)
    servers.append(server)
    return server


# --- help and version ---------------------------------------------------------------------------


def test_top_level_help_shows_the_commands_and_global_options() -> None:
    done = iscl("--help", env=child_env())
    assert done.returncode == 0, done.stderr
    for text in ("-v, --verbose", "--version", "demo", "server", "client", "iscl demo"):
        assert text in done.stdout, text


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("server", [*KEY_HOLDER_OPTIONS, *LINK_OPTIONS, "--listen HOST:PORT"]),
        ("client", [*KEY_HOLDER_OPTIONS, *LINK_OPTIONS, "host", "port"]),
        ("demo", KEY_HOLDER_OPTIONS),
    ],
)
def test_each_command_shows_its_options(command: str, expected: list[str]) -> None:
    done = iscl(command, "--help", env=child_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: iscl {command}")
    for option in expected:
        assert option in done.stdout, option


def test_version() -> None:
    done = iscl("--version", env=child_env())
    assert (done.returncode, done.stdout) == (0, f"iscl-hsm {__version__} (MEDIS-ISCL V1.00)\n")


def test_a_command_is_required() -> None:
    done = iscl(env=child_env())
    assert done.returncode == 2 and "usage: iscl" in done.stderr and done.stdout == ""


# --- server and client joined to stdin and stdout -------------------------------------------------


def _transfer(
    hospitals: Hospitals, servers: list[Server], tmp_path: Path, to_server: bytes, to_client: bytes,
    server_args: Sequence[str] = (), client_args: Sequence[str] = (),
) -> tuple[Server, subprocess.CompletedProcess[str], bytes, bytes]:  # fmt: skip
    """Run hospital A's server and hospital B's client with these inputs; return what each wrote."""
    paths = {name: tmp_path / name for name in ("server.in", "server.out", "client.in", "client.out")}
    paths["server.in"].write_bytes(to_client)
    paths["client.in"].write_bytes(to_server)
    env = child_env(hospitals)
    server = start_server(
        servers,
        [*token_args(hospitals, hospitals.a), *server_args],
        env,
        paths["server.in"],
        paths["server.out"],
    )
    with open(paths["client.in"], "rb") as stdin, open(paths["client.out"], "wb") as stdout:
        client = iscl(
            "client", "127.0.0.1", server.port, *token_args(hospitals, hospitals.b), *client_args,
            env=env, stdin=stdin, stdout=stdout,
        )  # fmt: skip
    assert server.finish() == 0, server.lines
    assert client.returncode == 0, client.stderr
    return server, client, paths["server.out"].read_bytes(), paths["client.out"].read_bytes()


@pytest.mark.parametrize("direction", ["client-to-server", "server-to-client", "both-ways"])
def test_stdin_arrives_on_the_peers_stdout_byte_identical(
    hospitals: Hospitals, servers: list[Server], tmp_path: Path, profile: Profile, direction: str
) -> None:
    to_server = os.urandom(3_000_000) if direction != "server-to-client" else b""
    to_client = os.urandom(3_000_017) if direction != "client-to-server" else b""
    chosen = ["--profile", profile.value]
    server, client, server_out, client_out = _transfer(
        hospitals, servers, tmp_path, to_server, to_client, chosen, chosen
    )
    assert server_out == to_server
    assert client_out == to_client
    assert without_close_note(profile, server.lines[1:], client.stderr.splitlines()) == (
        [LINK_LINE[profile]], [LINK_LINE[profile]]
    )


def test_the_link_options_reach_both_ends(
    hospitals: Hospitals, servers: list[Server], tmp_path: Path, profile: Profile
) -> None:
    common = ["--profile", profile.value, "--encryption", "none", "--mac", "md5", "--enc-key-id", "session",
              "--auth-key-id", "6", "--record-keys", "token", "--allow-unkeyed-md5"]  # fmt: skip
    to_server, to_client = os.urandom(300_001), os.urandom(200_003)
    server, client, server_out, client_out = _transfer(
        hospitals, servers, tmp_path, to_server, to_client,
        [*common, "--max-block", "1024", "--auth-data", "Hospital A"],
        [*common, "--max-block", "4096", "--auth-data", "Hospital B"],
    )  # fmt: skip
    assert (server_out, client_out) == (to_server, to_client)
    link = (f"ISCL link up: MEDIS-ISCL V1.00, {profile.value} profile, block 1024 bytes, auth key 6, none + md5"
            " with session keys")
    assert without_close_note(profile, server.lines[1:], client.stderr.splitlines()) == (
        [f"{link}, peer auth data 'Hospital B'"], [f"{link}, peer auth data 'Hospital A'"]
    )


ON_A_KEY_1_LINK = set(V100_PAYLOAD_SIZES) - {MessageId.RNDNO_FOR_SESSION_KEY_RQ, MessageId.RNDNO_FOR_SESSION_KEY_RP}
"""The builders' messages a link under encryption key 1 sends (random numbers are for session keys)."""


def test_with_no_profile_option_the_wire_is_the_sdks(
    hospitals: Hospitals, servers: list[Server], tmp_path: Path,
    mitm: Callable[[int, Callable[[str, Any], bytes]], TamperingProxy],
) -> None:  # fmt: skip
    """No --profile on either end: every message has the builder's size, and the first secured message
    decrypts, outside iscl-hsm, as DES-CBC under encryption key 1 from a zero IV (then PKCS#5 padding)."""
    data = os.urandom(50_000)
    (tmp_path / "client.in").write_bytes(data)
    env = child_env(hospitals)
    server = start_server(servers, token_args(hospitals, hospitals.a), env, None, tmp_path / "server.out")
    proxy = mitm(server.port, lambda direction, frame: frame.raw)
    with open(tmp_path / "client.in", "rb") as stdin:
        client = iscl("client", "127.0.0.1", proxy.port, *token_args(hospitals, hospitals.b), env=env, stdin=stdin)
    assert client.returncode == 0, client.stderr
    assert server.finish() == 0, server.lines
    assert (tmp_path / "server.out").read_bytes() == data
    seen = [(MessageId(f.message_id), len(f.payload)) for _, f in proxy.frames if f.message_id in V100_PAYLOAD_SIZES]
    assert {mid for mid, _ in seen} == ON_A_KEY_1_LINK
    assert [(mid, size) for mid, size in seen if size != V100_PAYLOAD_SIZES[mid]] == []
    frames = [f for direction, f in proxy.frames if direction == "c2s"]
    first = next(i for i, f in enumerate(frames) if f.is_(MessageId.MESSAGE_TRANSMISSION_NOTIF))
    blocks = b"".join(f.payload for f in frames[first:] if f.is_(MessageId.MESSAGE_TRANSMISSION_NOTIF))
    key = HOSPITAL_KEYS[("enc", 1)]
    decryptor = Cipher(TripleDES(key * 3), modes.CBC(bytes(8))).decryptor()
    plain = decryptor.update(blocks[: len(blocks) // 8 * 8])
    assert plain[:4096] == data[:4096]


def test_a_profile_mismatch_fails_both_ends_naming_the_profile(
    hospitals: Hospitals, servers: list[Server], tmp_path: Path
) -> None:
    env = child_env(hospitals)
    server = start_server(servers, [*token_args(hospitals, hospitals.a), "--profile", "hardened"], env, None,
                          tmp_path / "server.out")  # fmt: skip
    client = iscl("client", "127.0.0.1", server.port, *token_args(hospitals, hospitals.b), env=env)
    assert client.returncode == 1
    assert "profile" in one_line(client.stderr)
    assert "profile" in server.wait_for("failed during the handshake").string


def test_a_peer_with_a_smaller_max_message_gets_smaller_messages(
    hospitals: Hospitals, servers: list[Server], tmp_path: Path
) -> None:
    to_server, to_client = os.urandom(500_000), os.urandom(400_000)
    _, _, server_out, client_out = _transfer(
        hospitals,
        servers,
        tmp_path,
        to_server,
        to_client,
        ["--max-message", "5000"],
        ["--max-message", "7000"],
    )
    assert (server_out, client_out) == (to_server, to_client)


def test_the_server_survives_failed_handshakes(
    hospitals: Hospitals, servers: list[Server], tmp_path: Path
) -> None:
    """A stranger (wrong auth key 1) and a client whose token lacks auth key 3 fail; the next one works."""
    env = child_env(hospitals)
    server = start_server(servers, token_args(hospitals, hospitals.a), env, None, tmp_path / "server.out")
    port = server.port

    wrong_key = iscl("client", "127.0.0.1", port, *token_args(hospitals, hospitals.stranger), env=env)
    assert wrong_key.returncode == 1
    line = one_line(wrong_key.stderr)
    assert "different keys at authentication index 1" in line and "AUTHENTICATION_FAILED" in line
    failure = server.wait_for("failed during the handshake")
    assert "AUTHENTICATION_FAILED" in failure.string

    missing = iscl(
        "client", "127.0.0.1", port, *token_args(hospitals, hospitals.stranger), "--auth-key-id", "3", env=env
    )
    assert missing.returncode == EXIT_CONFIG
    line = one_line(missing.stderr)
    assert "'iscl-auth-3'" in line and hospitals.stranger.label in line and "KEY_NOT_FOUND" in line
    assert "REMOTE_KEY_HOLDER" in server.wait_for("failed during the handshake").string

    good = iscl("client", "127.0.0.1", port, *token_args(hospitals, hospitals.b), env=env)
    assert good.returncode == 0, good.stderr
    assert server.finish() == 0, server.lines


def test_a_key_missing_on_the_servers_token_is_named_there(
    hospitals: Hospitals, servers: list[Server], tmp_path: Path
) -> None:
    env = child_env(hospitals)
    server = start_server(
        servers, token_args(hospitals, hospitals.stranger), env, None, tmp_path / "server.out"
    )
    client = iscl(
        "client", "127.0.0.1", server.port, *token_args(hospitals, hospitals.a), "--auth-key-id", "3", env=env
    )
    assert client.returncode == 1
    assert "REMOTE_KEY_HOLDER" in one_line(client.stderr)
    failure = server.wait_for("failed during the handshake").string
    assert "'iscl-auth-3'" in failure and hospitals.stranger.label in failure and "KEY_NOT_FOUND" in failure


# --- one link, how it ends, and signals ------------------------------------------------------------


class Client(Background):
    """`iscl client` in the background, its stdin a pipe the test writes and closes."""

    def __init__(self, port: int, args: Sequence[object], env: dict[str, str], stdout: Path) -> None:
        with open(stdout, "wb") as sink:
            super().__init__(
                [sys.executable, "-m", "iscl_hsm", "client", "127.0.0.1", port, *args], env,
                stdin=subprocess.PIPE, stdout=sink,
            )  # fmt: skip

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data.decode("latin-1"))
        self.proc.stdin.flush()

    def end_input(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    started: list[Client] = []
    yield started
    for client in started:
        client.kill()


def no_traceback(*outputs: Sequence[str]) -> None:
    for lines in outputs:
        assert not [line for line in lines if "Traceback" in line or "never retrieved" in line], lines


def test_the_server_refuses_a_second_client_while_its_link_runs(
    hospitals: Hospitals, servers: list[Server], clients: list[Client], tmp_path: Path, profile: Profile
) -> None:
    env, chosen = child_env(hospitals), ["--profile", profile.value]
    server = start_server(servers, [*token_args(hospitals, hospitals.a), *chosen], env, None, tmp_path / "server.out")
    port = server.port
    first = Client(port, [*token_args(hospitals, hospitals.b), *chosen], env, tmp_path / "first.out")
    clients.append(first)
    first.send(b"from the first client")
    server.wait_for("ISCL link up")
    second = iscl("client", "127.0.0.1", port, *token_args(hospitals, hospitals.b), *chosen, env=env)
    assert second.returncode == 1
    assert "cannot connect" in one_line(second.stderr)
    first.end_input()
    assert first.finish() == 0, first.lines
    assert server.finish() == 0, server.lines
    assert (tmp_path / "server.out").read_bytes() == b"from the first client"
    closed_by_client = [line for line in server.lines if CLOSE_NOTE in line]
    assert len(closed_by_client) == (1 if profile is Profile.V100 else 0)  # the server's own input ended first
    no_traceback(server.lines, first.lines)


def test_accept_many_writes_each_link_to_its_own_file_until_sigterm(
    hospitals: Hospitals, servers: list[Server], tmp_path: Path
) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    env = child_env(hospitals)
    server = start_server(servers, [*token_args(hospitals, hospitals.a), "--accept-many", incoming], env, None,
                          tmp_path / "server.out")  # fmt: skip
    port = server.port
    sent = [os.urandom(n) for n in (10, 100_000, 1)]
    for n, data in enumerate(sent, 1):
        (tmp_path / "in").write_bytes(data)
        with open(tmp_path / "in", "rb") as stdin:
            done = iscl("client", "127.0.0.1", port, *token_args(hospitals, hospitals.b), env=env, stdin=stdin)
        assert done.returncode == 0, done.stderr
        server.wait_for(rf"link {n} from 127\.0\.0\.1:\d+: {len(data)} bytes in .*link-{n}\.bin$")
    assert server.stop() == 0
    assert server.lines[-1] == "iscl server: stopped by SIGTERM; 3 link(s), 0 failed, 0 aborted"
    for n, data in enumerate(sent, 1):
        path = incoming / f"link-{n}.bin"
        assert path.read_bytes() == data
        assert path.stat().st_mode & 0o777 == 0o600
    no_traceback(server.lines)


@pytest.mark.parametrize("stopped", ["server", "client"])
def test_sigterm_during_a_link_ends_both_ends_with_one_line_and_a_failure(
    hospitals: Hospitals, servers: list[Server], clients: list[Client], tmp_path: Path, stopped: str
) -> None:
    env = child_env(hospitals)
    server = start_server(servers, token_args(hospitals, hospitals.a), env, None, tmp_path / "server.out")
    client = Client(server.port, token_args(hospitals, hospitals.b), env, tmp_path / "client.out")
    clients.append(client)
    client.send(b"partial")
    server.wait_for("ISCL link up")
    target, other = (server, client) if stopped == "server" else (client, server)
    assert target.stop() == 143
    assert target.lines[-1] == f"iscl {stopped}: stopped by SIGTERM; the link was aborted"
    assert other.finish() == 1  # its link was cut: never reported as success
    assert other.lines[-1].startswith("iscl: ")
    no_traceback(server.lines, client.lines)


# --- configuration mistakes: exit 1 and one clear line ---------------------------------------------


def test_the_server_accepts_only_the_allowed_key_pairs(
    hospitals: Hospitals, servers: list[Server], tmp_path: Path
) -> None:
    env = child_env(hospitals)
    server = start_server(
        servers, [*token_args(hospitals, hospitals.a), "--allow-key-id", "2"], env, None, tmp_path / "server.out"
    )
    port = server.port
    refused = iscl("client", "127.0.0.1", port, *token_args(hospitals, hospitals.b), env=env)
    assert refused.returncode == 1
    assert "BAD_OPTION" in one_line(refused.stderr)
    assert "BAD_OPTION" in server.wait_for("failed during the handshake").string
    allowed = iscl(
        "client", "127.0.0.1", port, *token_args(hospitals, hospitals.b), "--auth-key-id", "2", env=env
    )
    assert allowed.returncode == 0, allowed.stderr
    assert "auth key 2" in allowed.stderr
    assert server.finish() == 0, server.lines


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--auth-data", "x" * 129], "authentication data must be 0..128 bytes in the v1.00 profile"),
        (["--profile", "hardened", "--auth-data", ""], "authentication data must be 1..128 bytes in the hardened"),
        (["--encryption", "none", "--mac", "md5"], "no protection against tampering"),
    ],
    ids=["auth-data-too-long", "hardened-without-auth-data", "plain-md5"],
)
def test_a_value_the_protocol_cannot_take_is_refused_before_any_token_is_made(
    tmp_path: Path, options: list[str], says: str
) -> None:
    done = iscl("client", "127.0.0.1", "2761", *options, env=child_env(XDG_DATA_HOME=str(tmp_path)))
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert says in line and "BAD_OPTION" in line
    assert list(tmp_path.iterdir()) == []  # the demo token was not created



@pytest.mark.parametrize("command", ["server", "client"])
@pytest.mark.parametrize("via", ["pin-file", "ISCL_PIN"])
def test_a_wrong_pin_is_one_line_without_the_pin(
    hospitals: Hospitals, tmp_path: Path, command: str, via: str
) -> None:
    wrong = "wrong-" + secrets.token_hex(6)
    token = hospitals.stranger
    extra: dict[str, str] = {}
    args = ["--token", token.label]
    if via == "pin-file":
        (tmp_path / "pin").write_text(wrong + "\n")
        args += ["--pin-file", str(tmp_path / "pin")]
    else:
        extra["ISCL_PIN"] = wrong
    target = ["--listen", "127.0.0.1:0"] if command == "server" else ["127.0.0.1", "1"]
    done = iscl(command, *target, *args, env=child_env(hospitals, **extra))
    assert done.returncode == EXIT_CONFIG
    line = one_line(done.stderr)
    assert f"wrong PIN for PKCS#11 token '{token.label}'" in line
    assert wrong not in done.stderr + done.stdout and token.pin not in done.stderr + done.stdout


def test_an_unknown_token_label_is_named(hospitals: Hospitals) -> None:
    done = iscl(
        "client", "127.0.0.1", "1", "--token", "no-such-token", "--pin-file", hospitals.pin_file(hospitals.a),
        env=child_env(hospitals),
    )  # fmt: skip
    assert done.returncode == EXIT_CONFIG
    line = one_line(done.stderr)
    assert "PKCS#11 token 'no-such-token' not found" in line
    assert f"'{hospitals.a.label}'" in line  # the tokens that are there


def test_a_missing_module_is_named(hospitals: Hospitals, tmp_path: Path) -> None:
    missing = tmp_path / "lib" / "libvendor-pkcs11.so"
    done = iscl(
        "server", "--listen", "127.0.0.1:0", "--pkcs11-module", missing, *token_args(hospitals, hospitals.a),
        env=child_env(hospitals),
    )  # fmt: skip
    assert done.returncode == EXIT_CONFIG
    line = one_line(done.stderr)
    assert f"PKCS#11 module {missing} could not be loaded: no such file" in line


def test_a_missing_pin_file_is_named(hospitals: Hospitals, tmp_path: Path) -> None:
    done = iscl(
        "client", "127.0.0.1", "1", "--token", hospitals.a.label, "--pin-file", tmp_path / "nope.pin",
        env=child_env(hospitals),
    )  # fmt: skip
    assert done.returncode == EXIT_CONFIG
    assert f"cannot read the PIN file {tmp_path / 'nope.pin'}" in one_line(done.stderr)


def test_no_pin_at_all_says_how_to_give_one(hospitals: Hospitals) -> None:
    done = iscl("client", "127.0.0.1", "1", "--token", hospitals.a.label, env=child_env(hospitals))
    assert done.returncode == EXIT_CONFIG
    assert "pass --pin-file FILE or set ISCL_PIN" in one_line(done.stderr)


def test_nothing_listening_is_one_line(hospitals: Hospitals) -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    done = iscl("client", "127.0.0.1", port, *token_args(hospitals, hospitals.a), env=child_env(hospitals))
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert "Connect call failed" in line and str(port) in line


def test_an_address_in_use_is_one_line(hospitals: Hospitals) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = iscl(
            "server",
            "--listen",
            f"127.0.0.1:{port}",
            *token_args(hospitals, hospitals.a),
            env=child_env(hospitals),
        )
    assert done.returncode == 1
    assert "address already in use" in one_line(done.stderr)


def test_a_bad_listen_address_is_one_line(hospitals: Hospitals) -> None:
    done = iscl("server", "--listen", "2761", *token_args(hospitals, hospitals.a), env=child_env(hospitals))
    assert done.returncode == 1
    assert one_line(done.stderr) == "iscl: --listen wants HOST:PORT, not '2761'"


# --- the demo -------------------------------------------------------------------------------------

SUITE_ROWS = {
    (enc, mac, keys)
    for enc in ("none", "des-cbc")
    for mac in ("none", "md5", "des-mac")
    for keys in ("key 1", "session")
}


def _demo_rows(stdout: str) -> dict[tuple[str, str, str], str]:
    rows = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 8 and cells[0] in ("none", "des-cbc"):
            rows[(cells[0], cells[1], cells[2])] = cells[7]
    return rows


def test_the_demo_makes_its_token_and_reuses_it(tmp_path: Path) -> None:
    env = child_env(XDG_DATA_HOME=str(tmp_path))  # no SOFTHSM2_CONF: the demo makes its own
    data = tmp_path / "iscl-hsm"

    first = iscl("demo", env=env)
    assert first.returncode == 0, first.stderr
    assert _demo_rows(first.stdout) == dict.fromkeys(SUITE_ROWS, "ok")
    assert first.stdout.count("| ok |") == 12
    assert "Key holder: PKCS#11 token 'iscl-demo'" in first.stderr
    tokens = sorted(path.name for path in (data / "tokens").iterdir())
    pin = (data / "pin").read_text()
    assert len(tokens) == 1 and (data / "pin").stat().st_mode & 0o777 == 0o600
    assert pin.strip() not in first.stdout + first.stderr

    second = iscl("demo", env=env)
    assert second.returncode == 0, second.stderr
    assert _demo_rows(second.stdout) == dict.fromkeys(SUITE_ROWS, "ok")
    assert sorted(path.name for path in (data / "tokens").iterdir()) == tokens  # the same token
    assert (data / "pin").read_text() == pin


def test_the_demo_on_a_named_token(hospitals: Hospitals) -> None:
    done = iscl(
        "demo", *token_args(hospitals, hospitals.a), "--record-keys", "token", env=child_env(hospitals)
    )
    assert done.returncode == 0, done.stderr
    assert _demo_rows(done.stdout) == dict.fromkeys(SUITE_ROWS, "ok")
    assert f"Key holder: PKCS#11 token '{hospitals.a.label}'" in done.stderr
