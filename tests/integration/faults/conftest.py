"""Fixtures for the fault tests: links whose peer dies, whose token or card goes away, whose disk fills.

Each fault is made with the real mechanism where there is one: SIGKILL for a dead peer, a private
SoftHSM2 token whose files are deleted, a PKCS#11 module that starts failing (failing_pkcs11.c, a
shim in front of SoftHSM2 that the child process loads with --pkcs11-module, so the failure comes up
through python-pkcs11 exactly as a broken device's would), pcscd stopped or a virtual card pulled
(those are in ../card/test_card_gateway.py, beside the card rack: pcscd's session fixture must
be one per process), and a small tmpfs mounted in a mount namespace of the storage SCP's own.
Every fixture fails, never skips, when what it needs is missing.

What each test checks is the issue's rule: a fault ends with one clear line (no traceback) within
the timeouts, the other links of the same gateway carry on, and success is reported if and only if
what was sent arrived intact.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from ..background import TIMEOUT, Background
from ..conftest import HOSPITAL_KEYS
from ..gateway.conftest import (  # noqa: F401 - fixtures for the gateway tests here
    gateway_loop,
    link_lines,
    start_tunnel,
    storescp,
    tunnel_command,
)
from ..test_cli import REPO, child_env

TRAILER = "iscl: "
"""How the one line a failing `iscl` command ends with starts."""


# --------------------------------------------------------------------------------------------------
# Waiting without timing assertions


def wait_until(condition: Callable[[], bool], what: str, *processes: subprocess.Popen[str] | Background) -> None:
    """Poll ``condition`` until it holds; fail if one of ``processes`` ends first, or after TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        for process in processes:
            popen = process.proc if isinstance(process, Background) else process
            if popen.poll() is not None and not condition():
                pytest.fail(f"{popen.args!r} ended (status {popen.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def assert_one_failure_line(lines: Sequence[str], *expected: str) -> str:
    """``lines`` (a failed command's stderr) end with one ``iscl: `` line and hold no traceback; that
    line contains each of ``expected``. Returns it."""
    assert not [line for line in lines if "Traceback" in line or "Exception ignored" in line], "\n".join(lines)
    assert lines and lines[-1].startswith(TRAILER), lines
    assert len([line for line in lines if line.startswith(TRAILER)]) == 1, lines
    for text in expected:
        assert text in lines[-1], f"{text!r} not in {lines[-1]!r}"
    return lines[-1]


# --------------------------------------------------------------------------------------------------
# `iscl server` and `iscl client` fed without end


class Feeder:
    """Writes random data into a command's stdin until :meth:`end` or until the command goes away, and
    keeps in ``record`` everything it meant to write (written there first, so what the command read
    is always a prefix of it).

    A transfer fed so has no end of its own: however late the test gets to its fault (a loaded machine
    may starve it for seconds), the fault still finds the link in the middle of its transfer.
    """

    CHUNK = 64 * 1024

    def __init__(self, stdin: IO[bytes], record: Path) -> None:
        self._stdin = stdin
        self._record = record
        self._left: int | None = None  # bytes still to write once end() was called
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self._record.open("wb") as record, contextlib.suppress(OSError, ValueError):
            try:
                while True:
                    with self._lock:
                        size = self.CHUNK if self._left is None else min(self.CHUNK, self._left)
                        if self._left is not None:
                            self._left -= size
                    if size == 0:
                        return
                    chunk = os.urandom(size)
                    record.write(chunk)
                    record.flush()
                    self._stdin.write(chunk)
                    self._stdin.flush()
            finally:
                self._stdin.close()

    def end(self, after: int = 0) -> None:
        """Write ``after`` more bytes, then close the command's stdin; wait until that is done."""
        with self._lock:
            self._left = after
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "the command took none of its input"


@dataclass
class LinkEnds:
    """A running `iscl server` and `iscl client`, each fed without end (``feeders``) and writing ``*.out``."""

    server: Background
    client: Background
    feeders: dict[str, Feeder]
    folder: Path

    def sent(self, end: str) -> bytes:
        """What ``end`` was given to send (all of it, once its feeder has stopped)."""
        return (self.folder / f"{end}.in").read_bytes()

    def received(self, end: str) -> bytes:
        return (self.folder / f"{end}.out").read_bytes()

    def end(self, name: str) -> Background:
        return self.server if name == "server" else self.client

    def wait_received(self, end: str, size: int) -> None:
        """Wait until ``end`` wrote ``size`` bytes of what the other end sends (so the link is in the
        middle of its transfer)."""
        wait_until(lambda: file_size(self.folder / f"{end}.out") >= size, f"{size} bytes at the {end}",
                   self.server, self.client)  # fmt: skip


@pytest.fixture
def link_ends(tmp_path: Path) -> Iterator[Callable[..., LinkEnds]]:
    """``link_ends(server=(args, env), client=(args, env), server_sends=True)``: start `iscl server` on a free
    port, then `iscl client` to it, each sending random data without end (the server nothing, if not
    ``server_sends``); both are killed after the test if still running."""
    started: list[Background] = []

    def start(*, server: tuple[Sequence[object], dict[str, str]], client: tuple[Sequence[object], dict[str, str]],
              server_sends: bool = True) -> LinkEnds:  # fmt: skip
        folder = tmp_path / f"link-{len(started) // 2}"
        folder.mkdir()
        server_end = _command(started, ["server", "--listen", "127.0.0.1:0", *server[0]], server[1], folder, "server")
        port = int(server_end.wait_for(r"^iscl server: listening on 127\.0\.0\.1:(\d+)$").group(1))
        client_end = _command(started, ["client", "127.0.0.1", port, *client[0]], client[1], folder, "client")
        feeders = {name: Feeder(_stdin(end), folder / f"{name}.in")
                   for name, end in (("server", server_end), ("client", client_end))}  # fmt: skip
        if not server_sends:
            feeders["server"].end()
        return LinkEnds(server_end, client_end, feeders, folder)

    yield start
    for command in started:
        command.kill()


def _command(started: list[Background], args: Sequence[object], env: dict[str, str], folder: Path,
             end: str) -> Background:  # fmt: skip
    with open(folder / f"{end}.out", "wb") as sink:
        command = Background([sys.executable, "-m", "iscl_hsm", *args], env, stdin=subprocess.PIPE, stdout=sink)
    started.append(command)
    return command


def _stdin(command: Background) -> IO[bytes]:
    """The command's stdin as bytes (Background opens its pipes as text)."""
    stdin = command.proc.stdin
    assert stdin is not None
    return stdin.buffer  # type: ignore[attr-defined,no-any-return]


def kill(process: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """SIGKILL: the process ends at once, saying nothing to anyone (its sockets are closed by the kernel)."""
    process.send_signal(signal.SIGKILL)
    process.wait(TIMEOUT)


# --------------------------------------------------------------------------------------------------
# A token of the test's own, whose files the test may delete


@dataclass(frozen=True)
class PrivateToken:
    """A SoftHSM2 token holding HOSPITAL_KEYS in a data folder of its own (nothing else lives there)."""

    label: str
    pin_file: Path
    data_dir: Path
    env: dict[str, str]

    def args(self, module: str | None = None) -> list[str]:
        """The `iscl` options that open this token (through ``module``, default SoftHSM2's)."""
        extra = [] if module is None else ["--pkcs11-module", module]
        return ["--token", self.label, "--pin-file", str(self.pin_file), *extra]

    def remove_files(self) -> list[Path]:
        """Delete the token's files (as a careless administrator or a failed disk would); returns them."""
        removed = sorted((self.data_dir / "tokens").iterdir())
        assert removed, f"no token files in {self.data_dir / 'tokens'}"
        for path in removed:
            shutil.rmtree(path)
        return removed


@pytest.fixture
def private_token(tmp_path: Path) -> PrivateToken:
    """A new token made by a child process (this process's SoftHSM2 sees only the session's folder)."""
    data_dir = tmp_path / "private-softhsm"
    key_file = tmp_path / "hospital.keys"
    key_file.write_text("".join(f"{purpose} {index} {value.hex()}\n" for (purpose, index), value in HOSPITAL_KEYS.items()))
    label = "iscl-private"
    done = subprocess.run(
        [sys.executable, "-m", "iscl_hsm.keyholder.provision", "--data-dir", str(data_dir), "--label", label,
         "--key-file", str(key_file)],
        env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    env = child_env(SOFTHSM2_CONF=str(data_dir / "softhsm2.conf"))
    return PrivateToken(label, data_dir / "pin", data_dir, env)


# --------------------------------------------------------------------------------------------------
# A PKCS#11 module that starts failing


@dataclass(frozen=True)
class FailingModule:
    """failing_pkcs11.c, built: SoftHSM2 until ``trigger`` exists, CKR_DEVICE_ERROR from then on."""

    path: Path
    trigger: Path

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """``base`` with the variable that names the trigger file."""
        return {**base, "ISCL_TEST_P11_FAIL_IF": str(self.trigger)}

    def fail(self) -> None:
        """From now on, every key and random-number call of the processes on this module fails."""
        self.trigger.touch()


@pytest.fixture(scope="session")
def failing_module_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from iscl_hsm.keyholder.pkcs11 import DEFAULT_MODULE

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.fail("the fault tests build a failing PKCS#11 module and need a C compiler: apt-get install gcc")
    source = Path(__file__).with_name("failing_pkcs11.c")
    library = tmp_path_factory.mktemp("failing-pkcs11") / "libfailing-pkcs11.so"
    done = subprocess.run(
        [compiler, "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror", f'-DREAL_MODULE="{DEFAULT_MODULE}"',
         "-o", str(library), str(source), "-ldl"],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"building {source.name} failed:\n{done.stderr}"
    return library


@pytest.fixture
def failing_module(failing_module_library: Path, tmp_path: Path) -> FailingModule:
    """The failing module with a trigger file of this test's own (absent: the module works)."""
    return FailingModule(failing_module_library, tmp_path / "break-the-module")


__all__ = ["FailingModule", "Feeder", "LinkEnds", "PrivateToken", "assert_one_failure_line", "file_size", "kill",
           "wait_until"]
