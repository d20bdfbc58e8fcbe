"""`iscl echo`, `iscl store` and `iscl serve` as child processes, against each other and DCMTK.

Hospital A serves, hospital B sends; the stranger's token holds a different auth key 1. What runs a
link end to end (echo and store to serve, a stranger, a flipped byte, DCMTK through a tunnel, the demo)
runs in both wire profiles, chosen with --profile on every command.
"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from iscl_hsm.engine import Config, Profile
from iscl_hsm.keyholder.base import KeyHolder
from iscl_hsm.wire import MessageId
from tests.helpers import split_frames

from ..conftest import Hospitals, raw_client_handshake
from ..test_cli import LINK_LINE, TIMEOUT, child_env, iscl, one_line, token_args
from .conftest import Background, assert_stored_exactly, dcmtk, make_study, python_iscl


def profile_args(profile: Profile) -> list[str]:
    return ["--profile", profile.value]


def start_serve(background: list[Background], hospitals: Hospitals, output: Path, *extra: object) -> tuple[Background, int]:
    serve = Background(
        python_iscl("serve", "--output", output, "--listen", "127.0.0.1:0", *token_args(hospitals, hospitals.a),
                    *extra),
        child_env(hospitals),
    )  # fmt: skip
    background.append(serve)
    port = int(serve.wait_for(rf"^iscl serve: listening on 127\.0\.0\.1:(\d+), storing into {output}$").group(1))
    return serve, port


def test_echo_and_store_a_study_through_iscl_serve(
    hospitals: Hospitals, background: list[Background], tmp_path: Path, profile: Profile
) -> None:
    output = tmp_path / "stored"
    output.mkdir()
    serve, port = start_serve(background, hospitals, output, *profile_args(profile))
    env = child_env(hospitals)
    client = [*token_args(hospitals, hospitals.b), *profile_args(profile)]

    echo = iscl("echo", "127.0.0.1", port, *client, "--aec", "ISCL-SCP", env=env)
    assert echo.returncode == 0, echo.stderr
    lines = echo.stdout.splitlines()
    assert lines[0] == LINK_LINE[profile]
    assert lines[1].startswith(f"C-ECHO ISCL-SCP at 127.0.0.1:{port}: status 0x0000 (Success), round trip ")
    assert lines[1].endswith(" ms") and len(lines) == 2

    sent = make_study(tmp_path / "study" / "series", images=5)
    store = iscl("store", "127.0.0.1", port, tmp_path / "study", *client, env=env)
    assert store.returncode == 0, store.stderr
    summary = store.stderr.splitlines()
    assert len(summary) == 1 and summary[0].startswith("iscl store: stored 5 of 5 files (")
    assert summary[0].endswith("; 0 failed, 0 skipped")
    assert_stored_exactly(output, sent)
    for path in sent:
        serve.wait_for(rf"^iscl serve: stored {output}/[0-9.]+\.dcm \(\d+ bytes\) from ISCL-SCU$")
    assert serve.stop() == 0  # SIGTERM is a clean stop


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: signal.Signals(s).name)
def test_a_signal_stops_serve_at_once_and_ends_its_open_link(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], background: list[Background], tmp_path: Path,
    signum: int,
) -> None:  # fmt: skip
    """A link up but still without an association (pynetdicom cannot abort that state) once kept
    serve from exiting until the ACSE timeout; it is ended now, with one line and no traceback."""
    (tmp_path / "out").mkdir()
    serve, port = start_serve(background, hospitals, tmp_path / "out")
    sock, _ = raw_client_handshake(port, holders(hospitals.b), Config())
    with sock:
        serve.proc.send_signal(signum)
        assert serve.finish() == 0
        heard = b""
        with contextlib.suppress(ConnectionResetError):
            while data := sock.recv(1 << 16):
                heard += data
    assert {f.message_id for f in split_frames(heard)} <= {MessageId.LINE_DISCONNECTION_RQ}  # then the end
    # (0 when the signal overtook the link's last handshake step: that link is dropped at exit)
    assert re.fullmatch(rf"iscl serve: stopped by {signal.Signals(signum).name}; [01] association\(s\) aborted",
                        serve.lines[-1]), serve.lines  # fmt: skip
    assert not [line for line in serve.lines if "Traceback" in line or "Error" in line], serve.lines


def test_store_reports_and_skips_files_that_are_not_dicom(
    hospitals: Hospitals, background: list[Background], tmp_path: Path
) -> None:
    output = tmp_path / "stored"
    output.mkdir()
    _, port = start_serve(background, hospitals, output)
    sent = make_study(tmp_path / "in", images=2)
    (tmp_path / "in" / "README").write_text("not DICOM")
    (tmp_path / "in" / "lost.dcm").symlink_to(tmp_path / "nowhere")
    store = iscl("store", "127.0.0.1", port, tmp_path / "in", *token_args(hospitals, hospitals.b),
                 env=child_env(hospitals))  # fmt: skip
    assert store.returncode == 1
    assert store.stderr.splitlines() == [
        f"iscl store: skipped {tmp_path}/in/README: not a DICOM Part 10 file",
        f"iscl store: skipped {tmp_path}/in/lost.dcm: cannot read it: No such file or directory",
        store.stderr.splitlines()[2],
    ]
    assert store.stderr.splitlines()[2].endswith("; 0 failed, 2 skipped")
    assert_stored_exactly(output, sent)


def test_a_folder_without_dicom_files_is_an_error(tmp_path: Path, hospitals: Hospitals) -> None:
    (tmp_path / "empty").mkdir()
    store = iscl("store", "127.0.0.1", "1", tmp_path / "empty", env=child_env(hospitals))
    assert store.returncode == 1
    assert store.stderr == f"iscl store: no DICOM files found in {tmp_path}/empty\n"


def test_a_write_failure_makes_store_fail(hospitals: Hospitals, background: list[Background], tmp_path: Path) -> None:
    """After start-up the output folder is replaced by a regular file: every write fails, even as root."""
    output = tmp_path / "stored"
    output.mkdir()
    serve, port = start_serve(background, hospitals, output)
    shutil.rmtree(output)
    output.write_bytes(b"")
    sent = make_study(tmp_path / "in", images=2)
    store = iscl("store", "127.0.0.1", port, *sent, *token_args(hospitals, hospitals.b), env=child_env(hospitals))
    assert store.returncode == 1
    lines = store.stderr.splitlines()
    assert lines[:2] == [f"iscl store: {path}: status 0xA700 (Failure)" for path in sent]
    assert lines[2].startswith("iscl store: stored 0 of 2 files (") and lines[2].endswith("; 2 failed, 0 skipped")
    failure = serve.wait_for(r"^iscl serve: FAILED to store ")
    assert failure.string.endswith("from ISCL-SCU: Not a directory (answered 0xA700)")
    assert output.read_bytes() == b""
    assert serve.stop() == 0
    assert all(line.startswith("iscl serve: ") for line in serve.lines), serve.lines  # one line per event


def test_serve_refuses_an_output_folder_it_cannot_use(tmp_path: Path, hospitals: Hospitals) -> None:
    (tmp_path / "file").write_text("")
    for folder in (tmp_path / "missing", tmp_path / "file" / "sub"):
        done = iscl("serve", "--output", folder, "--listen", "127.0.0.1:0", *token_args(hospitals, hospitals.a),
                    env=child_env(hospitals))  # fmt: skip
        assert done.returncode == 1
        assert one_line(done.stderr).startswith(
            f"iscl: the output folder {folder} does not exist: create it or choose another with --output"
        )


@pytest.mark.parametrize("command", ["echo", "store"])
def test_a_stranger_is_refused_with_one_line(
    hospitals: Hospitals, background: list[Background], tmp_path: Path, command: str, profile: Profile
) -> None:
    """The same line in both profiles: the server finds the stranger's response wrong, which hardened
    tells the client with its own NAK and V1.00 with the one NAK it gives for every authentication failure."""
    output = tmp_path / "stored"
    output.mkdir()
    serve, port = start_serve(background, hospitals, output, *profile_args(profile))
    paths = make_study(tmp_path / "in", images=1) if command == "store" else []
    done = iscl(command, "127.0.0.1", port, *paths, *token_args(hospitals, hospitals.stranger),
                *profile_args(profile), env=child_env(hospitals))  # fmt: skip
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert "different keys at authentication index 1" in line and "AUTHENTICATION_FAILED" in line
    assert done.stdout == ""
    assert "AUTHENTICATION_FAILED" in serve.wait_for(r"^iscl serve: ISCL link from 127\.0\.0\.1:\d+ failed: ").string
    assert list(output.iterdir()) == []


def test_a_peer_of_the_other_profile_is_named_in_one_line(
    hospitals: Hospitals, background: list[Background], tmp_path: Path
) -> None:
    """`iscl serve` in hardened, `iscl echo` in the default V1.00: no negotiation, both ends say why."""
    output = tmp_path / "stored"
    output.mkdir()
    serve, port = start_serve(background, hospitals, output, *profile_args(Profile.HARDENED))
    echo = iscl("echo", "127.0.0.1", port, *token_args(hospitals, hospitals.b), env=child_env(hospitals))
    assert echo.returncode == 1
    hint = "is the peer using the other profile? This end uses {}, and both ends must choose the same profile"
    assert hint.format("v1.00") in one_line(echo.stderr)
    assert hint.format("hardened") in serve.wait_for(r"^iscl serve: ISCL link from 127\.0\.0\.1:\d+ failed: ").string
    assert list(output.iterdir()) == []


@pytest.mark.parametrize("command", ["echo", "store", "serve"])
def test_each_command_teaches_its_options(command: str) -> None:
    done = iscl(command, "--help", env=child_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: iscl {command}")
    expected = ["--timeout", "--aet", "--token", "--pin-file", "--encryption", "--mac", "Example:"]
    expected += ["--output DIR", "--listen"] if command == "serve" else ["--aec"]
    for text in expected:
        assert text in done.stdout, text


def test_echo_to_a_plain_dicom_port_says_so(hospitals: Hospitals, background: list[Background], tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    background.append(Background([dcmtk("storescp"), "-od", tmp_path, port], child_env()))
    wait_until_listening(port)
    echo = iscl("echo", "127.0.0.1", port, "--handshake-timeout", "3", *token_args(hospitals, hospitals.b),
                env=child_env(hospitals))  # fmt: skip
    assert echo.returncode == 1
    line = one_line(echo.stderr)
    assert f"no ISCL handshake with 127.0.0.1:{port} within 3 s: is the peer an ISCL endpoint" in line
    assert "TIMED_OUT" in line and "--handshake-timeout" in line


def wait_until_listening(port: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
            return
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_plain_dicom_client_on_serves_port_fails_and_serve_carries_on(
    hospitals: Hospitals, background: list[Background], tmp_path: Path
) -> None:
    output = tmp_path / "stored"
    output.mkdir()
    serve, port = start_serve(background, hospitals, output, "--timeout", "5")
    plain = subprocess.run([dcmtk("echoscu"), "-to", "10", "127.0.0.1", str(port)], capture_output=True,
                           text=True, timeout=TIMEOUT, check=False)  # fmt: skip
    assert plain.returncode != 0
    assert "ISCL link from 127.0.0.1:" in serve.wait_for(r"^iscl serve: ISCL link from .* failed: ").string
    echo = iscl("echo", "127.0.0.1", port, *token_args(hospitals, hospitals.b), env=child_env(hospitals))
    assert echo.returncode == 0, echo.stderr


def test_dcmtk_storescu_through_iscl_tunnel_client_to_iscl_serve(
    hospitals: Hospitals, background: list[Background], tmp_path: Path, profile: Profile
) -> None:
    output = tmp_path / "stored"
    output.mkdir()
    _, port = start_serve(background, hospitals, output, *profile_args(profile))
    tunnel = Background(
        python_iscl("tunnel", "client", "--listen", "127.0.0.1:0", "--connect", f"127.0.0.1:{port}",
                    *token_args(hospitals, hospitals.b), *profile_args(profile)),
        child_env(hospitals),
    )  # fmt: skip
    background.append(tunnel)
    tunnel_port = tunnel.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1)
    sent = make_study(tmp_path / "in", images=3)
    storescu = subprocess.run(
        [dcmtk("storescu"), "-aet", "MODALITY", "-aec", "ISCL-SCP", "127.0.0.1", tunnel_port, *map(str, sent)],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert storescu.returncode == 0, storescu.stderr
    assert_stored_exactly(output, sent)


def test_the_demo_stores_a_study_over_iscl_and_checks_every_file(hospitals: Hospitals, profile: Profile) -> None:
    done = iscl("demo", "--images", "4", *token_args(hospitals, hospitals.a), *profile_args(profile),
                env=child_env(hospitals))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("| ok |") == 12
    dicom = done.stdout.splitlines()[-2:]
    assert dicom[0].startswith("DICOM over ISCL: a storage SCP (as `iscl serve`) on 127.0.0.1:")
    assert dicom[1].startswith("  stored 4 of 4 files in ")
    assert dicom[1].endswith("; 4 of 4 stored files equal the files sent")


def test_the_pynetdicom_example_in_the_docs_runs(tmp_path: Path) -> None:
    docs = Path(__file__).resolve().parents[3] / "docs" / "dicom.md"
    example = re.search(r"```python\n(.*?)```", docs.read_text(), re.DOTALL)
    assert example is not None
    done = subprocess.run(
        [sys.executable, "-c", example.group(1)], env=child_env(XDG_DATA_HOME=str(tmp_path)),
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1:3] == ["0", "[0, 0, 0]"]
    assert lines[0].startswith("LinkParameters(version='MEDIS-ISCL V1.00'")


def test_a_flipped_byte_makes_store_fail_and_serve_keep_only_what_came_before(
    hospitals: Hospitals, background: list[Background], tmp_path: Path, mitm: Callable[..., Any],
    profile: Profile,
) -> None:  # fmt: skip
    """The same in both profiles: the 6th data frame is past the link's first message (the A-ASSOCIATE-RQ),
    the only one V1.00's DES-CBC + DES-MAC cannot protect (first_message_malleable)."""
    output = tmp_path / "stored"
    output.mkdir()
    serve, port = start_serve(background, hospitals, output, *profile_args(profile))
    data_frames = 0

    def tamper(direction: str, frame: Any) -> bytes:
        nonlocal data_frames
        raw = bytearray(frame.raw)
        if direction == "c2s" and frame.message_id == MessageId.MESSAGE_TRANSMISSION_NOTIF:
            data_frames += 1
            if data_frames == 6:
                raw[40] ^= 0x01
        return bytes(raw)

    proxy = mitm(port, tamper)
    sent = make_study(tmp_path / "in", images=6)
    store = iscl("store", "127.0.0.1", proxy.port, *sent, *token_args(hospitals, hospitals.b),
                 *profile_args(profile), env=child_env(hospitals))  # fmt: skip
    assert store.returncode == 1
    lines = store.stderr.splitlines()
    assert all(line.startswith("iscl store: ") for line in lines), lines  # no pynetdicom log lines
    failed = [line for line in lines if line.startswith(f"iscl store: {tmp_path}")]
    assert lines[-1].endswith(f"; {len(failed)} failed, 0 skipped")
    stored = sent[: len(sent) - len(failed)]
    assert 0 < len(failed) < len(sent)
    assert failed[0].startswith(f"iscl store: {sent[len(stored)]}: no answer, the association was aborted: ")
    assert failed[1:] == [f"iscl store: {path}: not sent: the association was aborted" for path in sent[len(stored) + 1 :]]
    assert_stored_exactly(output, stored)
    assert "BAD_MAC" in serve.wait_for(r"^iscl serve: ISCL link from 127\.0\.0\.1:\d+ failed: ").string


def test_store_draws_a_progress_line_on_a_terminal(
    hospitals: Hospitals, background: list[Background], tmp_path: Path
) -> None:
    output = tmp_path / "stored"
    output.mkdir()
    _, port = start_serve(background, hospitals, output)
    sent = make_study(tmp_path / "in", images=3)
    terminal, child_side = pty.openpty()
    store = subprocess.Popen(
        python_iscl("store", "127.0.0.1", port, *sent, *token_args(hospitals, hospitals.b)),
        env=child_env(hospitals), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=child_side,
    )  # fmt: skip
    os.close(child_side)
    shown = b""
    while True:
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(terminal)
    assert store.wait(TIMEOUT) == 0
    text = shown.decode()
    assert re.search(r"\r\x1b\[K3/3 files, 0\.0/0\.0 MB, [0-9.]+ MB/s", text), text
    assert re.search(r"\r\x1b\[Kiscl store: stored 3 of 3 files \(", text), text
