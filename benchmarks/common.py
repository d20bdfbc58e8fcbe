"""What every benchmark shares: statistics, `openssl speed`, the SoftHSM2 token, the wire profiles and
their suites, child processes.

Figures are medians over rounds; ratios are taken round by round (both sides measured back to back)
and then their median is reported, so a slow moment on a shared machine hits both sides of a ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import multiprocessing
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

from iscl_hsm.engine import Config, Profile
from iscl_hsm.keyholder.provision import ensure_token, softhsm_environment
from iscl_hsm.wire import Encryption, Mac

REPO = Path(__file__).resolve().parents[1]
LEGACY_OPENSSL_CONF = REPO / "softhsm" / "openssl-legacy.cnf"
SPAWN = multiprocessing.get_context("spawn")
"""Server processes start fresh (no inherited PKCS#11 state), as they would on another machine."""
TOKEN_LABEL = "bench"
PLACEHOLDERS: dict[str, str] = {sys.executable: "python3"}
"""Text shown in place of long values in recorded commands (run.py adds the work folder)."""
_LIBC = ctypes.CDLL(None, use_errno=True)


SUITES = {
    "none/none": (Encryption.NONE, Mac.NONE),
    "none/md5": (Encryption.NONE, Mac.MD5),
    "none/des-mac": (Encryption.NONE, Mac.DES_MAC),
    "des-cbc/md5": (Encryption.DES_CBC, Mac.MD5),
    "des-cbc/des-mac": (Encryption.DES_CBC, Mac.DES_MAC),
}
"""ISCL's record protection choices, weakest first, by the names `iscl --encryption/--mac` take
("none/none" shows the framing alone)."""
PROFILES = tuple(Profile)
"""Both wire profiles, in the order every table shows them: V1.00 (the default), then hardened."""
BOTH = "both"
T = TypeVar("T")


def add_profile_option(parser: argparse.ArgumentParser, *, default: str = BOTH) -> None:
    """``--profile v1.00|hardened|both``: which wire profiles to measure; read it with :func:`profiles_of`."""
    parser.add_argument("--profile", choices=[p.value for p in PROFILES] + [BOTH], default=default,
                        help="wire profile to measure: v1.00, hardened, or both side by side"
                        " (default: %(default)s)")


def profiles_of(choice: str) -> tuple[Profile, ...]:
    """The profiles a ``--profile`` value names."""
    return PROFILES if choice == BOTH else (Profile(choice),)


def plain_md5(profile: Profile, suite: str) -> bool:
    """True when ``suite`` in ``profile`` sends the SDK's plain, unkeyed MD5 (V1.00 none/md5).

    The engine decides (Config.sends_unkeyed_md5), so the benchmarks follow whatever it refuses.
    """
    encryption, mac = SUITES[suite]
    return Config(profile=profile, encryption=encryption, mac=mac, allow_unkeyed_md5=True).sends_unkeyed_md5


def suite_config(profile: Profile, suite: str, **settings: Any) -> Config:
    """The Config of ``suite`` ("des-cbc/md5") in ``profile``; V1.00's plain MD5 is allowed knowingly."""
    encryption, mac = SUITES[suite]
    return Config(profile=profile, encryption=encryption, mac=mac, allow_unkeyed_md5=plain_md5(profile, suite),
                  **settings)


def suite_label(profile: Profile, suite: str) -> str:
    """How tables name ``suite`` in ``profile``: "v1.00 des-cbc/md5"; the plain MD5 says what it is."""
    label = f"{profile.value} {suite}"
    return f"{label} (the SDK's plain MD5, unkeyed)" if plain_md5(profile, suite) else label


def link_options(profile: Profile, suite: str) -> list[str]:
    """The `iscl` options (tunnel, serve, store) for ``suite`` in ``profile``."""
    encryption, mac = suite.split("/")
    options = ["--profile", profile.value, "--encryption", encryption, "--mac", mac]
    return [*options, "--allow-unkeyed-md5"] if plain_md5(profile, suite) else options


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value below which ``fraction`` of ``values`` lie (nearest rank; exact for small samples)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def openssl_speed(algorithm: str, seconds: int) -> float:
    """Bytes per wall-clock second of `openssl speed -elapsed -evp ALG` on 8192-byte buffers."""
    out = subprocess.run(
        openssl_speed_command(algorithm, seconds), capture_output=True, text=True, check=True,
        env={**os.environ, "OPENSSL_CONF": str(LEGACY_OPENSSL_CONF)},
    ).stdout  # fmt: skip
    match = re.search(rf"^{re.escape(algorithm)}\s+([\d.]+)k", out, re.MULTILINE | re.IGNORECASE)
    if not match:
        raise RuntimeError(f"cannot read the output of {' '.join(openssl_speed_command(algorithm, seconds))}:\n{out}")
    return float(match.group(1)) * 1000


def openssl_speed_command(algorithm: str, seconds: int) -> list[str]:
    return ["openssl", "speed", "-elapsed", "-seconds", str(seconds), "-bytes", "8192", "-evp", algorithm]


@dataclass(frozen=True)
class BenchToken:
    """A SoftHSM2 token with auth and enc keys 1..8, private to one benchmark run.

    Its encryption keys are host-readable: a V1.00 link with encryption key N uses key N itself as
    the DES key, which the host then reads once and runs in OpenSSL, as the hardened profile's record
    keys are. (With sensitive keys, or ``record_keys="token"``, V1.00 would run DES inside SoftHSM2.)
    """

    data_dir: Path
    label: str
    pin_path: Path

    @property
    def pin(self) -> str:
        return self.pin_path.read_text().strip()

    @property
    def environment(self) -> dict[str, str]:
        """Variables a child process (or `iscl`) needs to find this token."""
        return {**os.environ, "SOFTHSM2_CONF": softhsm_environment(self.data_dir)["SOFTHSM2_CONF"]}

    def cli_options(self) -> list[str]:
        return ["--token", self.label, "--pin-file", str(self.pin_path)]


def make_token(data_dir: Path) -> BenchToken:
    """Create the token (both ends of every link use it, as two hospitals sharing keys would)."""
    label, pin_path, _ = ensure_token(data_dir, TOKEN_LABEL, host_readable=True)
    return BenchToken(data_dir, label, pin_path)


def use_token_in_child(data_dir: str) -> None:
    """First thing in a spawned process that opens the token: point SoftHSM2 at it."""
    os.environ["SOFTHSM2_CONF"] = softhsm_environment(Path(data_dir))["SOFTHSM2_CONF"]


class Children:
    """Child processes of one benchmark section; all are stopped (by their own id) on exit."""

    def __init__(self) -> None:
        self._processes: list[Any] = []

    def spawn(self, target: Any, *args: Any) -> Any:
        process = SPAWN.Process(target=target, args=args, daemon=True)
        process.start()
        self._processes.append(process)
        return process

    def popen(self, command: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(command, **kwargs)
        self._processes.append(process)
        return process

    def stop(self, process: Any) -> None:
        """Stop one child: SIGTERM, then SIGKILL after 10 s."""
        if isinstance(process, subprocess.Popen):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
        else:
            if process.is_alive():
                process.terminate()
                process.join(10)
                if process.is_alive():
                    process.kill()
                    process.join(10)
        with contextlib.suppress(ValueError):
            self._processes.remove(process)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        for process in reversed(list(self._processes)):
            self.stop(process)


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1, for tools that cannot listen on port 0 (storescp)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


PORT_TAKEN = "Address already in use"
"""What storescp and stunnel write when another process took the port they were given."""


def on_a_free_port(start: Callable[[int], T], attempts: int = 3) -> T:
    """``start(port)`` on a port free right now, and on another one if a process took that port
    meanwhile (``start`` then raises a RuntimeError quoting :data:`PORT_TAKEN`): a tool that cannot
    listen on port 0 races every other program on the machine for the port it is given."""
    for _ in range(attempts - 1):
        try:
            return start(free_port())
        except RuntimeError as exc:
            if PORT_TAKEN not in str(exc):
                raise
    return start(free_port())


def wait_until(condition: Any, what: str, timeout: float = 30.0) -> None:
    """Poll ``condition()`` every 20 ms until it is true; RuntimeError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not ready within {timeout:g} s")
        time.sleep(0.02)


def cpu_seconds(pid: int) -> float:
    """CPU time that process ``pid`` (all its threads, ended ones too) has used so far, to the
    nanosecond: its POSIX CPU clock (clock_getcpuclockid(3)). /proc/PID/stat counts 10 ms ticks, too
    coarse for a tunnel that moves a few MB."""
    clock = ctypes.c_int()
    if error := _LIBC.clock_getcpuclockid(pid, ctypes.byref(clock)):
        raise ProcessLookupError(error, f"no CPU clock for process {pid}: {os.strerror(error)}")
    return time.clock_gettime(clock.value)


class CpuMeter:
    """CPU time (and wall time) of a ``with`` block: this process, its waited-for children and ``pids``.

    Waited-for children are the short-lived commands a run starts (storescu); ``pids`` are the
    long-lived ones it talks to (servers, tunnels), read from their CPU clocks. With ``own=False`` only ``pids``
    count (the CPU of the tunnels alone, say).
    """

    def __init__(self, pids: Sequence[int], *, own: bool = True) -> None:
        self._pids = list(pids)
        self._own = own
        self.seconds = 0.0
        self.wall = 0.0

    def _now(self) -> float:
        others = sum(cpu_seconds(pid) for pid in self._pids)
        if not self._own:
            return others
        own = resource.getrusage(resource.RUSAGE_SELF)
        waited = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + waited.ru_utime + waited.ru_stime + others

    def __enter__(self) -> Self:
        self.seconds, self.wall = -self._now(), -time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += self._now()
        self.wall += time.perf_counter()


def child_pids(pid: int) -> list[int]:
    """The PIDs of ``pid``'s child processes (a tunnel's workers, storescp --fork's association servers)."""
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()]


def resident_kib(pid: int) -> int:
    """Resident memory (VmRSS) of process ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")


def log(message: str) -> None:
    """Progress on stderr (the results go to files and stdout)."""
    print(message, file=sys.stderr, flush=True)


@dataclass
class Section:
    """One table of results: rows of named figures (or the reason a row could not be measured)."""

    key: str
    title: str
    columns: list[tuple[str, str]]
    """(figure name, column header) in table order."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    series: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """For plots: series name -> {"x": [...], "y": [...]}."""

    def add(self, label: str, **figures: float) -> None:
        self.rows.append({"label": label, "figures": figures})

    def unavailable(self, label: str, reason: str) -> None:
        self.rows.append({"label": label, "unavailable": reason})

    def command(self, argv: Sequence[str]) -> None:
        """Record a command as run (once per distinct command line), with ports and paths as placeholders."""
        text = re.sub(r"127\.0\.0\.1([: ])\d+", r"127.0.0.1\1PORT", " ".join(argv))
        text = re.sub(r"(storescp .*) \d+$", r"\1 PORT", text)
        for value, placeholder in PLACEHOLDERS.items():
            text = text.replace(value, placeholder)
        if text not in self.commands:
            self.commands.append(text)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "columns": [list(c) for c in self.columns], "rows": self.rows,
                "notes": self.notes, "commands": self.commands, "series": self.series}
