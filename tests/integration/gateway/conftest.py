"""Fixtures for the gateway tests: DCMTK tools, a storage SCP, tunnel pairs in-process and as commands.

In-process tunnels run on one background event loop thread (``gateway_loop``); DCMTK's echoscu,
storescu and storescp run as child processes. Hospital A's token serves, hospital B's connects (see
``hospitals`` in ../conftest.py). DCMTK is found by its ``--version`` banner, because pynetdicom
installs console scripts of the same names that may come first on PATH.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydicom import dcmread

from iscl_hsm import logs
from iscl_hsm.dicom.gateway import Address, Mode, Tunnel, TunnelSettings
from iscl_hsm.engine import Config
from iscl_hsm.keyholder.base import KeyHolder

from ... import logfmt
from ..conftest import Hospitals, SoftHsmToken, TamperingProxy

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[3]
TIMEOUT = 120.0
"""Seconds a child process or a coroutine may take: a safety net against hangs, never an assertion."""
GATEWAY_LOGGER = "iscl_hsm.dicom.gateway"


# --- DCMTK --------------------------------------------------------------------------------------


@functools.cache
def dcmtk(tool: str) -> str:
    """The path of DCMTK's ``tool``; the test fails when DCMTK is not installed."""
    candidates = [os.path.join(d, tool) for d in ("/usr/bin", *os.environ.get("PATH", "").split(os.pathsep))]
    for path in candidates:
        if os.access(path, os.X_OK):
            banner = subprocess.run([path, "--version"], check=False, capture_output=True, text=True).stdout
            if "dcmtk" in banner.lower():
                return path
    pytest.fail(f"DCMTK's {tool} is not installed: apt-get install dcmtk")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"{process.args!r} exited with {process.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    pytest.fail(f"nothing listens on 127.0.0.1:{port}")


@dataclass
class StoreScp:
    """A running DCMTK storescp that stores into ``folder`` (files named MODALITY.SOPInstanceUID)."""

    port: int
    folder: Path
    process: subprocess.Popen[str]

    def stored(self, sop_instance_uid: str) -> Path:
        return self.folder / f"CT.{sop_instance_uid}"

    def output(self) -> str:
        """Everything storescp printed (stops it first)."""
        self.stop()
        assert self.process.stdout is not None
        return self.process.stdout.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(TIMEOUT)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreScp]:
    """DCMTK storescp on a free port, a child process per association (--fork), verbose."""
    with running_storescp(tmp_path / "stored") as scp:
        yield scp


@contextlib.contextmanager
def running_storescp(folder: Path) -> Iterator[StoreScp]:
    """The ``storescp`` fixture's SCP, storing into ``folder`` (created), for a test that needs several."""
    folder.mkdir()
    port = free_port()
    process = subprocess.Popen(
        [dcmtk("storescp"), "-v", "--fork", "-od", str(folder), str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    scp = StoreScp(port, folder, process)
    try:
        wait_listening(port, process)
        yield scp
    finally:
        scp.stop()


def scu(tool: str, port: int, *files: Path, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run DCMTK echoscu or storescu against 127.0.0.1:port; output (both streams) in ``stdout``."""
    return subprocess.run(
        [dcmtk(tool), "-v", *options, "127.0.0.1", str(port), *map(str, files)],
        check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT,
    )  # fmt: skip


def assert_stored_identical(scp: StoreScp, sent: list[Path]) -> None:
    """Each sent file arrived with the same elements and the same pixel data."""
    for path in sent:
        original = dcmread(path)
        stored_path = scp.stored(original.SOPInstanceUID)
        assert stored_path.is_file(), f"{path.name} ({original.SOPInstanceUID}) was not stored"
        stored = dcmread(stored_path)
        assert stored.PixelData == original.PixelData, f"{path.name}: pixel data differs"
        assert stored == original, f"{path.name}: the stored dataset differs from the one sent"


# --- tunnels in this process --------------------------------------------------------------------


class LoopThread:
    """An event loop on a background thread; ``run(coro)`` waits for the result from the test thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT)
        self.loop.close()


@dataclass
class TunnelPair:
    """A server tunnel (hospital A) and a client tunnel (hospital B) in this process."""

    server: Tunnel
    client: Tunnel


@pytest.fixture
def gateway_loop() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture
def start_tunnel(gateway_loop: LoopThread) -> Iterator[Callable[..., Tunnel]]:
    """``start_tunnel(mode, target_port, holder, config, **settings)``: a started tunnel on port 0."""
    tunnels: list[Tunnel] = []

    def start(mode: Mode, target_port: int, holder: KeyHolder, config: Config, **settings: Any) -> Tunnel:
        tunnel = Tunnel(TunnelSettings(
            mode=mode, listen=Address("127.0.0.1", 0), target=Address("127.0.0.1", target_port),
            key_holder=holder, config=config, **settings,
        ))  # fmt: skip
        gateway_loop.run(tunnel.start())
        tunnels.append(tunnel)
        return tunnel

    yield start
    for tunnel in tunnels:
        gateway_loop.run(tunnel.stop(0))


@pytest.fixture
def tunnel_pair(
    hospitals: Hospitals, holders: Callable[..., KeyHolder], start_tunnel: Callable[..., Tunnel]
) -> Callable[..., TunnelPair]:
    """``tunnel_pair(forward_port, config, via=None)``: server tunnel forwarding to ``forward_port`` and a
    client tunnel connecting to it, or to ``via(server_port)`` (a man in the middle) when given."""

    def make(forward_port: int, config: Config, via: Callable[[int], int] | None = None,
             client_token: SoftHsmToken | None = None, client_config: Config | None = None) -> TunnelPair:
        server = start_tunnel(Mode.SERVER, forward_port, holders(hospitals.a), config)
        port = server.address.port if via is None else via(server.address.port)
        client = start_tunnel(Mode.CLIENT, port, holders(client_token or hospitals.b), client_config or config)
        return TunnelPair(server, client)

    return make


def via_proxy(
    mitm: Callable[[int, Callable[[str, Any], bytes]], TamperingProxy], tamper: Callable[[str, Any], bytes]
) -> Callable[[int], int]:
    """A ``via`` for ``tunnel_pair``: the client tunnel connects through a man in the middle who applies
    ``tamper`` (see TamperingProxy) to every frame."""

    def via(server_port: int) -> int:
        return mitm(server_port, tamper).port

    return via


@pytest.fixture
def link_lines(caplog: pytest.LogCaptureFixture) -> Callable[[int], list[str]]:
    """``link_lines(count)``: waits until the gateway logged ``count`` link lines, returns them all (as the
    logfmt a tunnel command writes, without time, level and logger)."""
    caplog.set_level(logging.INFO, logger=GATEWAY_LOGGER)

    def wait(count: int) -> list[str]:
        deadline = time.monotonic() + TIMEOUT
        while True:
            lines = [logs.logfmt({"msg": r.getMessage()} | logs.record_fields(r))
                     for r in caplog.records if r.name == GATEWAY_LOGGER]  # fmt: skip
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.02)

    return wait


LINE_KEYS = {"from": "source", "to": "target", "profile": "profile", "auth_key": "auth_key",
             "algorithms": "algorithms", "enc_key": "enc_key", "plain_to_iscl": "up", "iscl_to_plain": "down",
             "duration": "duration", "result": "result"}  # fmt: skip
"""A link line's keys, and the names the tests know them by."""


def parse_line(line: str) -> dict[str, str]:
    """A link line's fields; ``result`` is "closed" or "aborted: " and the error, as a person reads it."""
    values = logfmt.parse(line)
    assert values.get("msg") == "link", f"not a link line: {line!r}"
    fields = {name: values[key] for key, name in LINE_KEYS.items()}
    if fields["result"] == "aborted":
        fields["result"] = f"aborted: {values['error']}"
    else:
        assert fields["result"] == "closed" and "error" not in values, f"neither closed nor aborted: {line!r}"
    return fields


# --- tunnels as `iscl tunnel` commands ----------------------------------------------------------


def child_env(hospitals: Hospitals) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ISCL_PIN", "XDG_DATA_HOME", "PYTHONPATH")}
    env.update(PYTHONPATH=str(REPO), SOFTHSM2_CONF=hospitals.softhsm_conf)
    return env


@dataclass
class TunnelCommand:
    """A running `iscl tunnel` child; ``port`` is read from its "listening on HOST:PORT" line."""

    process: subprocess.Popen[bytes]
    log: Path
    port: int = 0

    def output(self) -> str:
        """What it printed to stderr so far."""
        return self.log.read_text()

    def wait_output(self, pattern: str) -> re.Match[str]:
        """Wait until stderr matches ``pattern``."""
        deadline = time.monotonic() + TIMEOUT
        while not (match := re.search(pattern, self.output())):
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{self.process.args!r} (status {self.process.returncode}) never printed"
                            f" {pattern!r}:\n{self.output()}")
            time.sleep(0.05)
        return match

    def stop(self, signum: int | None = signal.SIGTERM) -> tuple[int, str]:
        """Send ``signum`` (None: it was sent already), wait for the exit; returns the exit status and
        everything it printed."""
        if signum is not None and self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(TIMEOUT), self.output()


@pytest.fixture
def tunnel_command(hospitals: Hospitals, tmp_path: Path) -> Iterator[Callable[..., TunnelCommand]]:
    """``tunnel_command(mode, token, *options, env=None)``: start `python3 -m iscl_hsm tunnel MODE` on a free
    port, in ``env`` (default: the hospitals' tokens).

    Children still running after the test are killed.
    """
    started: list[TunnelCommand] = []

    def start(mode: str, token: SoftHsmToken | None, *options: object, env: dict[str, str] | None = None) -> TunnelCommand:
        log = tmp_path / f"tunnel-{mode}-{len(started)}.log"
        keys = [] if token is None else ["--token", token.label, "--pin-file", hospitals.pin_file(token)]
        with log.open("wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "iscl_hsm", "tunnel", mode, *map(str, keys), *map(str, options)],
                env=child_env(hospitals) if env is None else env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                cwd=REPO,
            )  # fmt: skip
        command = TunnelCommand(process, log)
        started.append(command)
        command.port = int(command.wait_output(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        return command

    yield start
    for command in started:
        if command.process.poll() is None:
            command.process.kill()
            command.process.wait(TIMEOUT)
